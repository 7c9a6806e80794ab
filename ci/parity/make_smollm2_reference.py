#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct loaded by Hugging Face transformers straight from
the GGUF file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, float32: transformers'
own dequantization and Q/K un-permutation), for stages/ml/tests/smollm2_parity.rs, which loads
the directory that halo-import-gguf makes from the same file and must reproduce them.

Writes, under stages/import-gguf/tests/data/:
  - smollm2_reference.json: for three token sequences, the ids, the argmax of the logits at every
    position and the maximum of the last position's logits; the chat prompt "What is the capital
    of France?" (ids from transformers' apply_chat_template) with transformers' greedy
    continuation (`generate(do_sample=False)`, 30 new tokens) and its text;
  - smollm2_last_logits.f32: the full-vocabulary logits of each sequence's last position,
    float32 little-endian, one row of vocab_size values per sequence, in order.

The texts have no digits, so transformers' GGUF tokenizer (which lacks SmolLM2's digit split)
tokenizes them like the original tokenizer.

    .venv/bin/pip install gguf accelerate
    bash ci/fetch-smollm2.sh
    .venv/bin/python ci/parity/make_smollm2_reference.py
"""

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
GGUF_DIR = ROOT / ".cache/smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = ROOT / "stages/import-gguf/tests/data"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def greet(name):\n    return f\"Hello, {name}!\"\n",
    "Binary feedback is cheaper to collect than preference pairs, and KTO learns from it directly.",
]
QUESTION = "What is the capital of France?"


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    sequences, last_logits = [], []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        sequences.append({"text": text, "ids": ids, "argmax": logits.argmax(-1).tolist(),
                          "last_max": logits[-1].max().item()})
        last_logits.append(logits[-1].numpy())

    messages = [{"role": "user", "content": QUESTION}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    new = out[0][prompt.shape[1]:]
    greedy = {"question": QUESTION, "prompt_ids": prompt[0].tolist(), "ids": new.tolist(),
              "text": tok.decode(new, skip_special_tokens=True)}
    assert "Paris" in greedy["text"], greedy["text"]

    reference = {"gguf": GGUF_NAME, "transformers": transformers.__version__, "torch": torch.__version__,
                 "vocab_size": model.config.vocab_size, "sequences": sequences, "greedy": greedy}
    (DATA / "smollm2_reference.json").write_text(json.dumps(reference, ensure_ascii=False) + "\n")
    np.stack(last_logits).astype("<f4").tofile(DATA / "smollm2_last_logits.f32")
    print(f"greedy answer: {greedy['text']!r}")


if __name__ == "__main__":
    main()
