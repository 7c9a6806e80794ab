#!/usr/bin/env python3
"""PEFT parity reference for haloflow's LoRA adapters: loads the adapter that halo-train wrote
(stages/ml/tests/data/lora-stories260k) onto stories260K with Python's `peft`, and stores its
per-token logits (and how far they are from the base model's, to show the adapter matters) in
stages/ml/tests/data/lora_stories260k_reference.json; stages/ml/tests/lora_parity.rs compares
haloflow's "base + adapter" logits with them. The other direction too: it writes an adapter
with peft itself (seeded, r = 2, alpha = 5 on q_proj/o_proj/up_proj, B not zero:
`init_lora_weights=False`) to stages/ml/tests/data/lora-peft-stories260k and stores its logits
under `peft_written`, for haloflow to load PEFT's own files.

The adapter was written by halo-train (4 KTO steps on HH-RLHF, r = 4, alpha = 8, every
projection; then base_model_name_or_path set to the placeholder `stories260K`, which the test
replaces with ../shared/models/stories260K):

    halo-import --source ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --format hh-rlhf \\
        --limit 200 --data pairs.arrow --summary s1.json
    halo-unpair --pairs pairs.arrow --binary binary.arrow --summary s2.json --drop-conflicts true
    halo-resample --data binary.arrow --plan plan.arrow --summary s3.json --seed 0
    halo-train --data plan.arrow --model ../shared/models/stories260K --loss kto --reference live \\
        --lr 1e-2 --max-steps 4 --max-prompt-length 64 --max-length 128 --device cpu --threads 1 \\
        --lora '{"r": 4, "alpha": 8, "dropout": 0.0}' --policy adapter --metrics m.parquet \\
        --report report --summary summary.json

Run (peft and its two extra dependencies installed outside the project venv):

    .venv/bin/pip install --target /tmp/lorapkgs --no-deps peft==0.21.2 accelerate==1.15.0 psutil==7.2.2
    PYTHONPATH=/tmp/lorapkgs:/tmp/tfpkgs .venv/bin/python ci/parity/make_lora_reference.py \\
        ../shared/models/stories260K
"""
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "stages/ml/tests/data/lora-stories260k"
PEFT_ADAPTER = ROOT / "stages/ml/tests/data/lora-peft-stories260k"
OUT = ROOT / "stages/ml/tests/data/lora_stories260k_reference.json"
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom had a red ball. He liked to play with it in the park every day.",
    "The cat was sad.",
]


def adapter_cases(model, ids: list, base_logits: list) -> list:
    """Per-token logits of `model` (a PeftModel) for each sequence of `ids`, and how far they are
    from the base model's `base_logits` (the adapter must matter for a test to prove anything)."""
    cases = []
    with torch.no_grad():
        for seq, base in zip(ids, base_logits):
            logits = model(torch.tensor([seq])).logits[0]
            cases.append({"ids": seq, "logits": f32_rows(logits), "max_abs_diff_from_base": (logits - base).abs().max().item()})
    return cases


def f32_rows(logits) -> list:
    """A float32 matrix as lists of numbers written with the fewest digits that read back as the
    same float32 (numpy's shortest repr): half the JSON of `tolist()`, no value changed."""
    return [[float(str(x)) for x in row] for row in logits.numpy()]


def adapted_modules(model) -> int:
    """How many modules of a PeftModel carry an adapter."""
    return sum(1 for n, _ in model.named_parameters() if "lora_A" in n)


def write_peft_adapter(load_base, config: LoraConfig, out: Path, placeholder: str):
    """An adapter written by peft itself (`config`, seeded: torch seed 0 before `load_base()` builds
    the fresh base model) saved to `out`, with base_model_name_or_path set to `placeholder` (the
    test points it at its base), target_modules sorted and without peft's README; returns the
    adapted model."""
    torch.manual_seed(0)
    written = get_peft_model(load_base(), config).eval()
    written.save_pretrained(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = placeholder
    saved["target_modules"] = sorted(saved["target_modules"])  # peft writes a set, in any order
    (out / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)
    return written


def main(base_dir: str) -> None:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = [[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    with torch.no_grad():
        base_logits = [base(torch.tensor([seq])).logits[0] for seq in ids]
    model = PeftModel.from_pretrained(base, str(ADAPTER)).eval()
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    cases = adapter_cases(model, ids, base_logits)
    config = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    load_base = lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    written = write_peft_adapter(load_base, config, PEFT_ADAPTER, "stories260K")
    out = {
        "made_by": "ci/parity/make_lora_reference.py",
        "versions": versions(),
        "adapter": "stages/ml/tests/data/lora-stories260k",
        "adapted_modules": adapted_modules(model),
        "cases": cases,
        "peft_written": {"adapter": "stages/ml/tests/data/lora-peft-stories260k", "cases": adapter_cases(written, ids, base_logits)},
    }
    OUT.write_text(json.dumps(out) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases, {out['adapted_modules']} adapted modules, "
          f"adapter changes logits by up to {max(c['max_abs_diff_from_base'] for c in cases):.4f}")


def versions() -> dict:
    """The versions of the Python side, stored with a reference."""
    return {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


if __name__ == "__main__":
    main(sys.argv[1])
