#!/usr/bin/env python3
"""Runs a command and writes its peak RSS in MiB to PREFIX.RANK (RANK from the environment, as
set by torchrun), for per-rank memory in the scaling benchmark.

    python maxrss.py PREFIX COMMAND ARGS...
"""
import os
import resource
import subprocess
import sys

subprocess.run(sys.argv[2:], check=True)
with open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}", "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
