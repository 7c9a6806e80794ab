#!/usr/bin/env python3
"""Checks that a model directory written by haloflow (halo-init, or a training checkpoint) loads
in Hugging Face transformers, and prints its logits for a fixed input so they can be compared
with haloflow's (`halo-logits`-style tests store them). Needs `pip install transformers`.

    python ci/parity/check_saved_checkpoint.py DIR [DIR ...]
"""
import sys

import torch
from transformers import AutoModelForCausalLM

for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 403, 407, 261, 378]])).logits[0]
    print(f"{path}: {type(model).__name__} loads; logits[0,:3]={logits[0, :3].tolist()} sum={logits.sum().item():.6f}")
