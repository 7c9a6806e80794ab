#!/usr/bin/env python3
"""The peer of the scaling benchmark: the KTO step of train_pytorch.py under PyTorch DDP (Gloo),
run by torchrun. Each optimizer step takes --accum microbatches of the plan in order; rank r of
N computes microbatches r, r+N, ... of them (gradient accumulation under no_sync, DDP's
allreduce on the last), so N ranks and one rank take the same steps. z0 is the global mean of
the KL terms (one allreduce of sum and count). Rank 0 writes per-step seconds.

    torchrun --nproc-per-node 2 train_ddp.py PLAN.arrow MODEL_DIR OUT.json --steps 6 --accum 2
"""
import argparse
import contextlib
import json
import time

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract import encode
from train_pytorch import seq_logps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert args.accum % world == 0, "--accum must be a multiple of the world size"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    policy = DistributedDataParallel(model) if world > 1 else model
    rows = pa.ipc.open_file(pa.memory_map(args.plan)).read_all().to_pylist()
    batches = {}
    for row in rows:
        batches.setdefault(row["batch"], []).append(row)
    batches = [batches[k] for k in sorted(batches)][: args.steps * args.accum]
    data = []
    for b in batches:
        main = [encode(tok, r["prompt"], r["completion"], args.max_prompt_length, args.max_length) for r in b]
        kl = [encode(tok, r["prompt"], r["kl_completion"], args.max_prompt_length, args.max_length) for r in b]
        labels = torch.tensor([r["label"] for r in b])
        with torch.no_grad():
            data.append((main, kl, labels, seq_logps(model, main), seq_logps(model, kl)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    seconds = []
    for step in range(args.steps):
        started = time.perf_counter()
        opt.zero_grad()
        mine = data[step * args.accum : (step + 1) * args.accum][rank::world]
        with torch.no_grad():
            kl_sum = torch.zeros(2, dtype=torch.float64)
            for main, kl, labels, ref_main, ref_kl in mine:
                d = (seq_logps(model, kl) - ref_kl).double()
                kl_sum += torch.stack([d.sum(), torch.tensor(float(len(d)), dtype=torch.float64)])
            if world > 1:
                dist.all_reduce(kl_sum)
            z0 = (kl_sum[0] / kl_sum[1]).clamp(min=0).float()
        for i, (main, kl, labels, ref_main, ref_kl) in enumerate(mine):
            last = i == len(mine) - 1
            sync = contextlib.nullcontext() if last or world == 1 else policy.no_sync()
            with sync:
                r = seq_logps(policy, main) - ref_main
                loss = torch.where(labels, 1 - torch.sigmoid(args.beta * (r - z0)), 1 - torch.sigmoid(args.beta * (z0 - r))).mean()
                (loss / len(mine)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        json.dump({"seconds": seconds, "world": world, "accum": args.accum, "rows_per_step": sum(len(b) for b in batches) / len(batches) * args.accum}, open(args.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
