#!/usr/bin/env python3
"""A peer of ci/bench-memory.sh and ci/bench-train.sh: TRL's KTOTrainer (a plan: rows with
their KL partners) or DPOTrainer (a paired table) on the same model, rows, microbatch of 8,
length limit and thread count, f32 on the CPU, with reference log-probs precomputed
(`precompute_ref_log_probs`, so no reference model is kept, as halo-train with a refcache
Parquet) `gradient_checkpointing` off or on, and optionally PEFT LoRA adapters (`--lora R`). Writes per-step seconds and tokens: the
non-padding positions of every model forward in the step (attention_mask sums, counted by a
forward hook), i.e. what TRL computed. TRL truncates differently (it keeps a sequence's start
and drops KTO rows whose prompt alone fills `max_length`), so its steps may hold other token
counts than halo-train's: compare time per token.

Needs trl and its dependencies, which the project's venv does not have; ci/bench/setup.sh's
`trl_path` installs them (pinned, with peft) into .cache/trl, or `TRL_PATH` names a directory holding them:

    pip install --target DIR --no-deps trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 ...

    python train_trl.py DATA.arrow MODEL_DIR OUT.json --loss kto|dpo --steps 3 --threads 1 [--gradient-checkpointing] [--lora 16]
"""
import json
import tempfile
import time

import pyarrow as pa
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from contract import peer_arguments
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer


class StepTimes(TrainerCallback):
    """Seconds and model tokens (non-padding positions of every forward) of each step."""

    def __init__(self, model):
        self.seconds, self.tokens, self.started, self.counted = [], [], None, 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.counted += int(mask.sum()) if mask is not None else (args[0] if args else kwargs["input_ids"]).numel()

    def on_step_begin(self, args, state, control, **kwargs):
        self.started, self.counted = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)
        self.tokens.append(self.counted)


def main():
    ap = peer_arguments(__doc__)
    ap.add_argument("--lora", type=int, default=0, help="train PEFT LoRA adapters of this rank (alpha = 2r, every projection)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = pa.ipc.open_file(pa.memory_map(args.data)).read_all().to_pylist()[: 8 * args.steps]
    text = lambda prompt: "\n\n".join(m["content"] for m in prompt)
    if args.loss == "kto":
        data = Dataset.from_list([{"prompt": text(r["prompt"]), "completion": r["completion"], "label": bool(r["label"])} for r in rows])
    else:
        data = Dataset.from_list([{"prompt": text(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    times = StepTimes(model)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=args.lr,
                      lr_scheduler_type="constant", max_length=args.max_length, precompute_ref_log_probs=True,
                      gradient_checkpointing=args.gradient_checkpointing, use_cpu=True, report_to=[],
                      save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
        peft = {}
        if args.lora:
            from peft import LoraConfig
            peft["peft_config"] = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        if args.loss == "kto":
            trainer = KTOTrainer(model=model, args=KTOConfig(**common), train_dataset=data, processing_class=tok, callbacks=[times], **peft)
        else:
            trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tok, callbacks=[times], **peft)
        trainer.train()
    json.dump({"seconds": times.seconds, "tokens": times.tokens, "rows": len(data)}, open(args.out, "w"))

if __name__ == "__main__":
    main()
