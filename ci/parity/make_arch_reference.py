#!/usr/bin/env python3
"""Reference values for haloflow's architecture parity test (stages/ml/tests/arch_parity.rs):
random tiny Qwen3, Gemma 2 and Gemma 3 (text) models written by halo-init, each with sliding-
window layers and a window shorter than the sequences, run by Hugging Face transformers (5.24
here; not needed to run the tests, which read the stored JSON and rebuild the same random weights
from the stored config and seed, as halo-init does, and check a checksum of them).

How it was run (from the repository root, after `source ci/env.sh` and a release build):

    T=../shared/models/stories260K
    halo-init --arch qwen3 --hidden 64 --layers 3 --heads 4 --kv-heads 2 --sliding-window 6 \\
        --max-window-layers 1 --init-std 0.25 --seed 21 --tokenizer $T --out /tmp/arch-qwen3
    halo-init --arch gemma2 --hidden 64 --layers 3 --heads 4 --kv-heads 2 --sliding-window 5 \\
        --query-pre-attn-scalar 24 --attn-softcap 2.5 --final-softcap 3 --init-std 0.25 --seed 22 \\
        --tokenizer $T --out /tmp/arch-gemma2
    halo-init --arch gemma3 --hidden 64 --layers 3 --heads 4 --kv-heads 2 --sliding-window 6 \\
        --global-every 3 --query-pre-attn-scalar 24 --init-std 0.25 --seed 23 --tokenizer $T \\
        --out /tmp/arch-gemma3
    PYTHONPATH=/tmp/tfpkgs .venv/bin/python ci/parity/make_arch_reference.py \\
        qwen3:21:/tmp/arch-qwen3 gemma2:22:/tmp/arch-gemma2 gemma3:23:/tmp/arch-gemma3 \\
        > stages/ml/tests/data/arch_reference.json

Run with `--add-cpu stages/ml/tests/data/arch_reference.json MODEL...` (the same MODEL
arguments) on another machine, it prints the stored reference with that machine's bf16 logits
added where they differ (`bf16.other_cpus`, with the CPU's name): the bf16 test accepts the
logits of any CPU recorded. Added on 2026-12-05 for an AMD EPYC with avx512_bf16, whose bf16
matmul (Gemma 2's eager attention) rounds differently from the machine that made the reference.

Stores per model what make_window_reference.py stores (its config.json and seed, a weight
checksum, per-token logits of prompts longer than the window, summed completion log-probs,
greedy generation from a prompt longer than the window, the full-attention gap), plus for a model
with soft-capping how far the logits move without it (`softcap_max_logit_difference`: the caps
must matter for the test to prove anything), and the logits of the longest prompt with the
weights in bf16 (`bf16`, with their distance from the f32 logits).
"""

import json
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from make_window_reference import PROMPTS, reference


def softcap_gap(path):
    """Max |Δlogit| between the model and the same weights without attention and final caps."""
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "attn_logit_softcapping", None) is None and getattr(config, "final_logit_softcapping", None) is None:
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    config.attn_logit_softcapping = None
    config.final_logit_softcapping = None
    uncapped = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, attn_implementation="eager").eval()
    gap = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            gap = max(gap, (model(ids).logits - uncapped(ids).logits).abs().max().item())
    return gap


def bf16_logits(path):
    """Logits of the longest prompt with the weights cast to bf16 (as `dtype=torch.bfloat16`
    loads them), and how far they are from the f32 model's. Attention as haloflow computes it:
    SDPA, or eager where soft-capping needs it (Gemma 2; transformers has no SDPA for it). In
    bf16 the two differ (0.17 for the Qwen3 model), in f32 they agree within 1e-5."""
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPTS[2])["input_ids"]
    config = AutoConfig.from_pretrained(path)
    attention = "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"
    out = {"ids": ids, "attention": attention}
    logits = {}
    for name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).eval()
        with torch.no_grad():
            logits[name] = model(torch.tensor([ids])).logits[0].float()
    out["logits"] = logits["bf16"].tolist()
    out["f32_max_logit_difference"] = (logits["bf16"] - logits["f32"]).abs().max().item()
    return out


def cpu_name():
    """This CPU's model name and whether it has native bf16 dot products (avx512_bf16), which
    change how a bf16 matmul rounds."""
    info = open("/proc/cpuinfo").read()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown CPU")
    return f"{name}, {'with' if ' avx512_bf16' in info else 'without'} avx512_bf16"


def add_other_cpu(reference_path, args):
    """Adds this CPU's bf16 logits to each model of the stored reference whose bf16 logits
    recorded so far it does not reproduce (`bf16.other_cpus`): bf16 matmul kernels round
    differently from one CPU to another (transformers' own bf16 logits of the Gemma 2 model
    differed by one bf16 step, 0.0625, in a third of the positions between two machines)."""
    stored = json.load(open(reference_path))
    by_name = {m["name"]: m for m in stored["models"]}
    for arg in args:
        name, _, path = arg.split(":", 2)
        here = bf16_logits(path)
        bf16 = by_name[name]["bf16"]
        assert here["ids"] == bf16["ids"], f"{name}: other prompt ids than the stored reference's"
        known = [bf16["logits"]] + [o["logits"] for o in bf16.get("other_cpus", [])]
        if here["logits"] not in known:
            bf16.setdefault("other_cpus", []).append(
                {"cpu": cpu_name(), "transformers": transformers.__version__, "torch": torch.__version__, "logits": here["logits"]})
    json.dump(stored, sys.stdout)


def main():
    torch.manual_seed(0)
    if sys.argv[1:2] == ["--add-cpu"]:
        return add_other_cpu(sys.argv[2], sys.argv[3:])
    models = []
    for arg in sys.argv[1:]:
        name, seed, path = arg.split(":", 2)
        out = reference(name, int(seed), path)
        gap = softcap_gap(path)
        if gap is not None:
            out["softcap_max_logit_difference"] = gap
        out["bf16"] = bf16_logits(path)
        models.append(out)
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "models": models}, sys.stdout)


if __name__ == "__main__":
    main()
