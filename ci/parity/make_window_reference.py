#!/usr/bin/env python3
"""Reference values for haloflow's sliding-window parity test (stages/ml/tests/window_parity.rs):
random tiny Mistral and Qwen2 models written by halo-init, with a window shorter than the
sequences, run by Hugging Face transformers (5.24 here; not needed to run the tests, which read
the stored JSON and rebuild the same random weights from the stored config and seed).

How it was run (from the repository root, after `source ci/env.sh` and a release build):

    halo-init --arch mistral --hidden 64 --layers 3 --heads 4 --kv-heads 2 --sliding-window 6 \\
        --init-std 0.25 --seed 11 --tokenizer ../shared/models/stories260K --out /tmp/win-mistral
    halo-init --arch qwen2 --hidden 64 --layers 3 --heads 4 --kv-heads 2 --sliding-window 5 \\
        --max-window-layers 1 --init-std 0.25 --seed 12 --tokenizer ../shared/models/stories260K \\
        --out /tmp/win-qwen2
    PYTHONPATH=/tmp/tfpkgs .venv/bin/python ci/parity/make_window_reference.py \\
        mistral:11:/tmp/win-mistral qwen2:12:/tmp/win-qwen2 \\
        > stages/ml/tests/data/window_reference.json

Stores per model, in float32: its config.json and seed, a checksum of the weights (so the test
knows it rebuilt the same ones), per-token logits of prompts longer than the window, summed
completion log-probs (haloflow's tokenization contract), greedy generation (up to 30 tokens) from a
prompt longer than the window, and how far full attention's logits are from the windowed ones
(the window must matter for the test to prove anything).
"""

import json
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Lily and Ben went to the park. They saw a big dog and",
    "Once upon a time",
    "One day, a big bird flew over the tall tree and sang a song",
]

EXAMPLES = [
    ("Once upon a time", ", there was a little girl named Lily who liked to play outside."),
    ("Tom had a toy car.", " He liked to play with it every day in the garden."),
]


def completion_logp(model, tok, prompt, completion):
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"] + [tok.eos_token_id]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    total = sum(logps[t - 1, full[t]].item() for t in range(start, len(full)))
    return {"ids": full, "completion_start": start, "logp": total, "n_tokens": len(full) - start}


def weight_abs_sum(path):
    """Sum of |w| over the weights of a model directory, in f64: the checksum the tests compare
    with the weights they rebuild from the stored config and seed."""
    return sum(float(t.double().abs().sum()) for t in load_file(f"{path}/model.safetensors").values())


def reference(name, seed, path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    config = json.load(open(f"{path}/config.json"))
    out = {"name": name, "seed": seed, "config": config, "class": type(model).__name__,
           "weight_abs_sum": weight_abs_sum(path),
           "logits": [], "examples": []}
    full_config = AutoConfig.from_pretrained(path)
    if full_config.model_type not in ("gemma2", "gemma3_text"):  # Gemma's masks need a window
        full_config.sliding_window = None
    if hasattr(full_config, "layer_types"):
        full_config.use_sliding_window = False
        full_config.layer_types = ["full_attention"] * full_config.num_hidden_layers
    full_model = AutoModelForCausalLM.from_pretrained(path, config=full_config, dtype=torch.float32, attn_implementation="eager").eval()
    gap = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            full = full_model(torch.tensor([ids])).logits[0].float()
        gap = max(gap, (logits - full).abs().max().item())
        out["logits"].append({"prompt": prompt, "ids": ids, "logits": logits.tolist()})
    out["full_attention_max_logit_difference"] = gap
    for prompt, completion in EXAMPLES:
        out["examples"].append(completion_logp(model, tok, prompt, completion))
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=30, do_sample=False)
        scores = model(gen).logits[0, ids.shape[1] - 1:-1].float()
    top2 = scores.topk(2, dim=-1).values
    out["greedy"] = {"prompt_ids": ids[0].tolist(), "ids": gen[0].tolist(),
                     "min_top2_gap": (top2[:, 0] - top2[:, 1]).min().item()}
    return out


def main():
    torch.manual_seed(0)
    models = []
    for arg in sys.argv[1:]:
        name, seed, path = arg.split(":", 2)
        models.append(reference(name, int(seed), path))
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "models": models}, sys.stdout)


if __name__ == "__main__":
    main()
