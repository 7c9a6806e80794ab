#!/usr/bin/env python3
"""Reads a TensorBoard run directory with TensorBoard's own EventAccumulator and prints, as
JSON, every scalar series ({tag: [[step, value], ...]}) and the HParams plugin's
hyperparameters. haloflow's tests use it to check the event files halo-train and halo-judge
write (src/tracking.rs).

    .venv/bin/python ci/read_tensorboard.py WORK_DIR/tracking/PIPELINE/STAGE-KEY8
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def main(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    hparams = {}
    try:
        contents = acc.PluginTagToContent("hparams")
    except KeyError:
        contents = {}
    for content in contents.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        for name, value in data.session_start_info.hparams.items():
            hparams[name] = getattr(value, value.WhichOneof("kind"))
    print(json.dumps({"scalars": scalars, "hparams": hparams}))


if __name__ == "__main__":
    main(sys.argv[1])
