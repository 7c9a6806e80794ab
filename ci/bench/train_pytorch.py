#!/usr/bin/env python3
"""The peer of the training benchmark: the same step as halo-train, written in PyTorch with
transformers, on the same model, microbatches, sequence lengths and thread count. KTO (a plan):
policy forward with grad on a microbatch's completions, KL-partner forward under no_grad,
precomputed reference log-probs, KTO loss; DPO (a paired table, microbatches of 8 pairs in row
order as halo-train takes them): chosen and rejected in one policy forward with grad,
precomputed reference log-probs, DPO loss; then backward, clip_grad_norm_, AdamW. Writes
per-step seconds and tokens (the sequences' lengths, as halo-train's tokens_computed).

    python train_pytorch.py DATA.arrow MODEL_DIR OUT.json --loss kto|dpo --steps 3 --threads 1 [--gradient-checkpointing]
"""
import json
import time

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract import encode, peer_arguments


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
    ap = peer_arguments(__doc__)
    ap.add_argument("--beta", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    rows = pa.ipc.open_file(pa.memory_map(args.data)).read_all().to_pylist()
    enc = lambda prompt, completion: encode(tok, prompt, completion, args.max_prompt_length, args.max_length)
    if args.loss == "kto":
        batches = {}
        for row in rows:
            batches.setdefault(row["batch"], []).append(row)
        batches = [batches[k] for k in sorted(batches)][: args.steps]
        # (first sequences, second sequences, labels) per microbatch: completions and KL partners.
        groups = [([enc(r["prompt"], r["completion"]) for r in b], [enc(r["prompt"], r["kl_completion"]) for r in b], torch.tensor([r["label"] for r in b])) for b in batches]
    else:
        batches = [rows[i : i + 8] for i in range(0, len(rows), 8)][: args.steps]
        groups = [([enc(r["prompt"], r["chosen"]) for r in b], [enc(r["prompt"], r["rejected"]) for r in b], None) for b in batches]
    with torch.no_grad():
        data = [(a, b, labels, seq_logps(policy, a), seq_logps(policy, b)) for a, b, labels in groups]
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    seconds, tokens = [], []
    for first, second, labels, ref_first, ref_second in data:
        started = time.perf_counter()
        opt.zero_grad()
        if args.loss == "kto":
            s_pol = seq_logps(policy, first)
            with torch.no_grad():
                z0 = (seq_logps(policy, second) - ref_second).mean().clamp(min=0)
            r = s_pol - ref_first
            loss = torch.where(labels, 1 - torch.sigmoid(args.beta * (r - z0)), 1 - torch.sigmoid(args.beta * (z0 - r))).mean()
        else:
            both = seq_logps(policy, first + second)
            m = len(first)
            margin = (both[:m] - ref_first) - (both[m:] - ref_second)
            loss = -torch.nn.functional.logsigmoid(args.beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        seconds.append(time.perf_counter() - started)
        tokens.append(sum(len(ids) for ids, _ in first + second))
    json.dump({"seconds": seconds, "tokens": tokens}, open(args.out, "w"))


if __name__ == "__main__":
    main()
