#!/usr/bin/env python3
"""PEFT parity reference for LoRA adapters of the Qwen3, Gemma 2 and Gemma 3 tiny random models of
arch parity (stages/ml/tests/data/arch_reference.json, made by make_arch_reference.py, which says
how halo-init wrote them). For each model, both directions of make_lora_reference.py (whose code
this shares): the adapter halo-train wrote (r = 4, alpha = 8 on every projection; copied to
stages/ml/tests/data/lora-arch/NAME with base_model_name_or_path the placeholder `arch-NAME`) is
loaded by `peft.PeftModel.from_pretrained` on the transformers model, and an adapter written by
peft itself (seeded, r = 2, alpha = 5 on q_proj/v_proj/down_proj, B not zero) goes to
stages/ml/tests/data/lora-arch/peft-NAME; per-token logits of arch parity's prompts (the longest
more than twice the sliding window) under each are stored in
stages/ml/tests/data/lora_arch_reference.json for stages/ml/tests/lora_parity.rs. Attention is
eager, as in arch parity (Gemma 2's soft-capping needs it).

How the adapters were written (from the repository root, after `source ci/env.sh`, a release
build and the three halo-init commands of make_arch_reference.py with --out /tmp/arch-NAME; the
plan as in make_lora_reference.py):

    halo-import --source ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --format hh-rlhf \\
        --limit 200 --data pairs.arrow --summary s1.json
    halo-unpair --pairs pairs.arrow --binary binary.arrow --summary s2.json --drop-conflicts true
    halo-resample --data binary.arrow --plan plan.arrow --summary s3.json --seed 0
    for a in qwen3 gemma2 gemma3; do
      halo-train --data plan.arrow --model /tmp/arch-$a --loss kto --reference live --lr 1e-2 \\
          --max-steps 2 --max-prompt-length 64 --max-length 128 --device cpu --threads 1 \\
          --lora '{"r": 4, "alpha": 8, "dropout": 0.0}' --policy /tmp/lora-$a --metrics m-$a.parquet \\
          --report report-$a --summary summary-$a.json
    done

Run (peft installed outside the project venv, as for make_lora_reference.py):

    .venv/bin/pip install --target /tmp/lorapkgs --no-deps peft==0.21.2 accelerate==1.15.0 psutil==7.2.2
    PYTHONPATH=/tmp/lorapkgs .venv/bin/python ci/parity/make_lora_arch_reference.py \\
        qwen3:/tmp/arch-qwen3:/tmp/lora-qwen3 gemma2:/tmp/arch-gemma2:/tmp/lora-gemma2 \\
        gemma3:/tmp/arch-gemma3:/tmp/lora-gemma3
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_lora_reference import adapted_modules, adapter_cases, versions, write_peft_adapter
from make_window_reference import PROMPTS, weight_abs_sum

DATA = Path(__file__).resolve().parents[2] / "stages/ml/tests/data"
OUT = DATA / "lora_arch_reference.json"
PEFT_CONFIG = dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM")


def copy_adapter(src: Path, dst: Path, placeholder: str) -> None:
    """halo-train's adapter files (config and weights) into `dst`, with base_model_name_or_path
    set to `placeholder` (the test points it at the base it rebuilds)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = placeholder
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_reference(name: str, base_dir: str, halo_adapter: str, arch: dict) -> dict:
    """Both adapters' logits on the model `name` of arch parity, whose halo-init directory is
    `base_dir` (checked against arch_reference.json: same config and weight checksum)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    checksum = weight_abs_sum(base_dir)
    assert config == arch["config"], f"{name}: {base_dir}/config.json is not arch parity's"
    assert abs(checksum - arch["weight_abs_sum"]) <= 1e-9 * checksum, f"{name}: {base_dir} has other weights than arch parity's"
    load_base = lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = [tok(prompt)["input_ids"] for prompt in PROMPTS]
    assert max(map(len, ids)) > 2 * config["sliding_window"], f"{name}: no prompt longer than twice the window"
    base = load_base()
    with torch.no_grad():
        base_logits = [base(torch.tensor([seq])).logits[0] for seq in ids]
    halo_dir = DATA / "lora-arch" / name
    copy_adapter(Path(halo_adapter), halo_dir, f"arch-{name}")
    model = PeftModel.from_pretrained(base, str(halo_dir)).eval()
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    peft_dir = DATA / "lora-arch" / f"peft-{name}"
    written = write_peft_adapter(load_base, LoraConfig(**PEFT_CONFIG), peft_dir, f"arch-{name}")
    out = {"name": name, "weight_abs_sum": checksum}
    for key, adapted, adapter in [("halo_written", model, halo_dir), ("peft_written", written, peft_dir)]:
        cases = adapter_cases(adapted, ids, base_logits)
        out[key] = {"adapter": str(adapter.relative_to(DATA)), "adapted_modules": adapted_modules(adapted), "cases": cases}
        print(f"{name}, {key}: {out[key]['adapted_modules']} adapted modules, adapter changes logits by up to "
              f"{max(c['max_abs_diff_from_base'] for c in cases):.4f}", file=sys.stderr)
    return out


def main() -> None:
    arch = {m["name"]: m for m in json.loads((DATA / "arch_reference.json").read_text())["models"]}
    models = []
    for arg in sys.argv[1:]:
        name, base_dir, halo_adapter = arg.split(":", 2)
        models.append(model_reference(name, base_dir, halo_adapter, arch[name]))
    out = {"made_by": "ci/parity/make_lora_arch_reference.py", "versions": versions(), "models": models}
    OUT.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
