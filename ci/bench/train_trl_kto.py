#!/usr/bin/env python3
"""A peer of ci/bench-memory.sh: TRL's KTOTrainer on the same model, plan rows (plain-text
prompts), microbatch, length limit and thread count, f32 on the CPU, with reference log-probs
precomputed (`precompute_ref_log_probs`, so no reference model is kept, as halo-train with a
refcache Parquet) and `gradient_checkpointing` off or on. Writes per-step seconds and tokens
(TRL truncates differently: it keeps a sequence's start and drops rows whose prompt alone
fills `max_length`, so its steps may hold fewer rows and tokens than halo-train's).

Needs trl and its dependencies, which the project's venv does not have: ci/bench-memory.sh runs
this only when `TRL_PATH` names a directory holding them, e.g.

    pip install --target /tmp/trlpkgs --no-deps trl==1.16.0 accelerate datasets pandas \\
        python-dateutil pytz tzdata dill multiprocess xxhash psutil requests urllib3 certifi \\
        charset-normalizer six

    python train_trl_kto.py PLAN.arrow MODEL_DIR OUT.json --steps 3 --threads 1 [--gradient-checkpointing]
"""
import argparse
import json
import tempfile
import time

import pyarrow as pa
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import KTOConfig, KTOTrainer


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds, self.started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = pa.ipc.open_file(pa.memory_map(args.plan)).read_all().to_pylist()[: 8 * args.steps]
    data = Dataset.from_list([{"prompt": "\n\n".join(m["content"] for m in r["prompt"]), "completion": r["completion"],
                               "label": bool(r["label"])} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = KTOConfig(output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=args.lr,
                           lr_scheduler_type="constant", max_length=args.max_length, precompute_ref_log_probs=True,
                           gradient_checkpointing=args.gradient_checkpointing, use_cpu=True, report_to=[],
                           save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
        trainer = KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[times])
        trainer.train()
    tokens = [round(h["num_tokens"]) for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    json.dump({"seconds": times.seconds, "tokens": [b - a for a, b in zip([0] + tokens, tokens)], "rows": len(data)}, open(args.out, "w"))


if __name__ == "__main__":
    main()
