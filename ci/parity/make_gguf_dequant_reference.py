#!/usr/bin/env python3
"""Reference dequantization of every tensor type halo-import-gguf reads, computed by gguf-py
(llama.cpp's Python package, `gguf.quants.dequantize`, a NumPy implementation independent of
halo-import-gguf's Rust one), for the unit test `dequant::tests::matches_gguf_py` in
stages/import-gguf/src/dequant.rs.

For each type: two blocks of random bytes (seeded; 16 random values for the float types), whose half-float scale fields are
overwritten with finite random values, and the float32 values gguf-py dequantizes them to.
Writes stages/import-gguf/tests/data/gguf_dequant_reference.json.

    .venv/bin/pip install gguf
    .venv/bin/python ci/parity/make_gguf_dequant_reference.py
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "stages/import-gguf/tests/data/gguf_dequant_reference.json"

# Byte offsets of the half-float fields of each block type (ggml-common.h).
HALF_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
BLOCKS = 2
FLOATS = 16


def random_blocks(rng, name):
    elements, size = GGML_QUANT_SIZES[T[name]]
    if name == "F32":
        return rng.normal(0, 3, FLOATS).astype("<f4").tobytes()
    if name == "F16":
        return rng.normal(0, 3, FLOATS).astype("<f2").tobytes()
    if name == "BF16":
        return (rng.normal(0, 3, FLOATS).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    data = bytearray(rng.integers(0, 256, BLOCKS * size, dtype=np.uint8).tobytes())
    for b in range(BLOCKS):
        for at in HALF_FIELDS[name]:
            scale = np.array([rng.uniform(-0.1, 0.1)], dtype="<f2").tobytes()
            data[b * size + at:b * size + at + 2] = scale
    return bytes(data)


def main():
    rng = np.random.default_rng(0)
    cases = []
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]:
        data = random_blocks(rng, name)
        values = dequantize(np.frombuffer(data, dtype=np.uint8), T[name]).astype(np.float32).reshape(-1)
        assert np.isfinite(values).all(), name
        cases.append({"type": name, "bytes": data.hex(), "values": [float(v) for v in values]})
    OUT.write_text(json.dumps({"gguf_py": version("gguf"), "cases": cases}) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
