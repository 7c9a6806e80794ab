#!/usr/bin/env python3
"""The peer of the training benchmark: the same KTO step as halo-train, written in PyTorch with
transformers (policy forward with grad on a microbatch's completions, KL-partner forward under
no_grad, precomputed reference log-probs, KTO loss, backward, clip_grad_norm_, AdamW), on the
same model, plan microbatches, sequence lengths and thread count. Prints per-step seconds.

    python train_pytorch.py PLAN.arrow MODEL_DIR OUT.json --steps 12 --threads 2 [--gradient-checkpointing]
"""
import argparse
import json
import time

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract import encode


def seq_logps(model, seqs):
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([ids + [0] * (t - len(ids)) for ids, _ in seqs])
    logits = model(ids).logits.float()[:, :-1]
    picked = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    mask = torch.zeros_like(picked)
    for r, (seq, start) in enumerate(seqs):
        mask[r, start - 1 : len(seq) - 1] = 1
    return (picked * mask).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward (transformers' gradient_checkpointing_enable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    rows = pa.ipc.open_file(pa.memory_map(args.plan)).read_all().to_pylist()
    batches = {}
    for row in rows:
        batches.setdefault(row["batch"], []).append(row)
    batches = [batches[k] for k in sorted(batches)][: args.steps]
    data = []
    for b in batches:
        main = [encode(tok, r["prompt"], r["completion"], args.max_prompt_length, args.max_length) for r in b]
        kl = [encode(tok, r["prompt"], r["kl_completion"], args.max_prompt_length, args.max_length) for r in b]
        labels = torch.tensor([r["label"] for r in b])
        with torch.no_grad():
            data.append((main, kl, labels, seq_logps(policy, main), seq_logps(policy, kl)))
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    seconds = []
    for main, kl, labels, ref_main, ref_kl in data:
        started = time.perf_counter()
        opt.zero_grad()
        s_pol = seq_logps(policy, main)
        with torch.no_grad():
            z0 = (seq_logps(policy, kl) - ref_kl).mean().clamp(min=0)
        r = s_pol - ref_main
        loss = torch.where(labels, 1 - torch.sigmoid(args.beta * (r - z0)), 1 - torch.sigmoid(args.beta * (z0 - r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        seconds.append(time.perf_counter() - started)
    json.dump({"seconds": seconds}, open(args.out, "w"))


if __name__ == "__main__":
    main()
