#!/usr/bin/env python3
"""A user's own data stage for haloflow, written in Python with pyarrow.

Reads a `paired` table (Arrow IPC file), keeps the pairs whose chosen and rejected replies are
both at least --min-chars characters long and differ from each other, and writes the kept rows
as a `paired` table. The runner validates the output against the `paired` schema before it
enters the cache, exactly as for built-in stages.

Wire it into a pipeline as a command stage (argv, never through a shell):

    [stages.filter]
    run = ["{vars.python}", "../stages/plugins/filter_pairs.py", "{in.pairs}", "{out.kept}",
           "--min-chars", "{params.min_chars}"]
    inputs = { pairs = "import_hh.data" }
    outputs = { kept = "paired" }
    params = { min_chars = 20 }

Run alone:  python3 filter_pairs.py pairs.arrow kept.arrow --min-chars 20
"""

import argparse
import sys

import pyarrow as pa
import pyarrow.compute as pc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", help="input paired table (.arrow)")
    parser.add_argument("kept", help="output paired table (.arrow)")
    parser.add_argument("--min-chars", type=int, default=20, help="minimum length of both replies")
    args = parser.parse_args()

    with pa.memory_map(args.pairs) as source:
        table = pa.ipc.open_file(source).read_all()
    long_enough = pc.and_(
        pc.greater_equal(pc.utf8_length(table["chosen"]), args.min_chars),
        pc.greater_equal(pc.utf8_length(table["rejected"]), args.min_chars),
    )
    different = pc.not_equal(table["chosen"], table["rejected"])
    kept = table.filter(pc.and_(long_enough, different))
    if kept.num_rows == 0:
        print(f"error: no pair of {args.pairs} has both replies of at least {args.min_chars} characters", file=sys.stderr)
        return 1
    with pa.OSFile(args.kept, "wb") as sink:
        with pa.ipc.new_file(sink, kept.schema) as writer:
            writer.write_table(kept)
    print(f"kept {kept.num_rows} of {table.num_rows} pairs (min {args.min_chars} chars)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
