#!/usr/bin/env python3
"""The peer of the refcache benchmark: summed completion log-probs of a `plan` table with a
Hugging Face transformers batched forward, padding each batch to its longest sequence (data
order, fixed batch size), under torch.no_grad, on the same model, data and thread count.

It follows haloflow's tokenization contract (contract.py), so both sides score the same tokens.

    python refcache_transformers.py PLAN.arrow MODEL_DIR OUT.json --threads 2 --batch-size 8
"""
import argparse
import json
import time

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract import encode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with pa.memory_map(args.plan) as f:
        table = pa.ipc.open_file(f).read_all().to_pylist()
    seqs = []
    for row in table:
        for completion in (row["completion"], row["kl_completion"]):
            seqs.append(encode(tok, row["prompt"], completion, args.max_prompt_length, args.max_length))
    tokens = sum(len(ids) for ids, _ in seqs)
    padded = 0
    results = []
    started = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(seqs), args.batch_size):
            batch = seqs[b : b + args.batch_size]
            t = max(len(ids) for ids, _ in batch)
            padded += t * len(batch)
            ids = torch.tensor([ids + [0] * (t - len(ids)) for ids, _ in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i, _ in batch])
            logps = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), dim=-1)
            picked = logps[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for r, (seq, start) in enumerate(batch):
                results.append(picked[r, start - 1 : len(seq) - 1].double().sum().item())
    seconds = time.perf_counter() - started
    json.dump({"tokens": tokens, "padded_tokens": padded, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "logps": results}, open(args.out, "w"))


if __name__ == "__main__":
    main()
