#!/usr/bin/env python3
"""Reference values for haloflow's parity tests on ../shared/models/stories260K, computed with
Hugging Face transformers (pip install transformers; not needed to run the tests, which read the
stored JSON).

    python ci/parity/make_stories_reference.py > stages/ml/tests/data/stories260k_reference.json

Stores, in float32:
  - per-token logits of single prompts (ids with BOS, exactly as the tokenizer gives them);
  - summed completion log-probs under haloflow's tokenization contract: prompt + completion + EOS
    tokenized together, the completion starting where those ids diverge from the prompt's ids;
  - the greedy continuation of "Once upon a time".
"""

import json
import sys

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

MODEL = sys.argv[1] if len(sys.argv) > 1 else "../shared/models/stories260K"

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park. They saw",
    "The little dog was sad because",
    "One day, a big red ball",
]

EXAMPLES = [
    ("Once upon a time", ", there was a little girl named Lily."),
    ("Once upon a time", " there was a big dog."),
    ("Tom had a toy car.", " He liked to play with it every day."),
    ("The sun was hot.", "Sue went to swim in the lake"),
    ("Mom said", " \"Let's go home now!\""),
]


def completion_logp(model, tok, prompt, completion):
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"] + [tok.eos_token_id]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    total = sum(logps[t - 1, full[t]].item() for t in range(start, len(full)))
    return {"prompt": prompt, "completion": completion, "ids": full, "completion_start": start,
            "logp": total, "n_tokens": len(full) - start}


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "logits": [], "examples": []}
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        out["logits"].append({"prompt": prompt, "ids": ids, "logits": logits.tolist()})
    for prompt, completion in EXAMPLES:
        out["examples"].append(completion_logp(model, tok, prompt, completion))
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=40, do_sample=False)
    out["greedy"] = {"prompt": "Once upon a time", "ids": gen[0].tolist(),
                     "text": tok.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
