#!/usr/bin/env python3
"""Expected token ids of SmolLM2-135M-Instruct's tokenizer on a varied text set, for the test
stages/import-gguf/tests/smollm2.rs, which rebuilds the tokenizer from the GGUF file with
halo-import-gguf and must reproduce them exactly.

The expected ids come from llama.cpp itself (llama-cpp-python, `Llama(vocab_only=True)
.tokenize(text, add_bos=False, special=True)`): the tokenizer that the GGUF file was made for,
implemented independently of Hugging Face `tokenizers` (its own BPE and its own
`LLAMA_VOCAB_PRE_TYPE_SMOLLM` pre-tokenizer: digits split off one by one, then the GPT-2
regex). Two cross-checks are stored beside them:

  - `tokenizers_ids`: Hugging Face `tokenizers` built here in Python from the GGUF vocabulary and
    merges (read with gguf-py) with the pre-tokenizer Sequence[Split(\\p{N}, Isolated),
    ByteLevel]; the script fails unless it equals llama.cpp on every text.
  - `transformers_gguf_ids`: transformers' own GGUF tokenizer conversion
    (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), which leaves the digit split out; the
    script fails unless it differs from llama.cpp on ":\\n\\n4".

llama-cpp-python compiles llama.cpp from source (about 10 minutes on 2 cores), so it lives in a
venv of its own, which this script (run with the project venv: transformers, torch, tokenizers,
gguf, accelerate) calls as a subprocess:

    python3 -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/pip install gguf accelerate
    bash ci/fetch-smollm2.sh
    .venv/bin/python ci/parity/make_smollm2_tokenization.py /tmp/llamacpp-venv/bin/python
"""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[2]
GGUF_DIR = ROOT / ".cache/smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "stages/import-gguf/tests/data/smollm2_tokenization.json"

TEXTS = [
    # digits
    "12345",
    ":\n\n4",
    " 4 apples",
    "The year 2024 had 365 days; pi is 3.14159 and a million is 1,000,000.",
    "Call 555-0199 before 10:30pm (ext. 42)",
    "x1y22z333",
    "½ ² Ⅻ ٣٤٥ ७८",
    # runs of whitespace
    "a  b   c    d",
    "\n\n\n",
    "line one\n\n\nline two\n",
    "\t\tindented\twith\ttabs",
    "   leading and trailing   ",
    "mixed \t\n \r\n whitespace \n\t ",
    "",
    # unicode
    "héllo wörld, naïve café",
    "日本語のテキストと中文分词测试",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "Ελληνικά και русский текст",
    "Zero\u200bwidth and non\u00a0breaking",
    # chat markup
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|>assistant\nSure!<|im_end|>",
    # code
    "def square(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    '<div class="note">&amp; 5 &lt; 6</div>',
    # punctuation and contractions
    "Hello, world! What's up? I'm fine; you're great... They'll've gone.",
    "!!!???...---***",
    "\"double\" 'single' (paren) [bracket] {brace} <angle>",
]


LLAMA_CPP_TOKENIZE = """
import json, sys, llama_cpp
path, texts = json.load(sys.stdin)
model = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
ids = [model.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
json.dump({"version": llama_cpp.__version__, "ids": ids}, sys.stdout)
"""


def llama_cpp_ids(python, path):
    """Token ids from llama.cpp, run by `python` (an interpreter with llama-cpp-python)."""
    done = subprocess.run([python, "-c", LLAMA_CPP_TOKENIZE], input=json.dumps([str(path), TEXTS]),
                          capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    return out["version"], out["ids"]


def tokenizers_from_gguf(path):
    """A Hugging Face tokenizer built from the GGUF vocabulary with llama.cpp's smollm split."""
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()
    tokens, merges, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"), field("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokens[i] for i, ty in enumerate(types) if ty == 3])
    return tok


def main():
    path = GGUF_DIR / GGUF_NAME
    llama_cpp_version, expected = llama_cpp_ids(sys.argv[1] if len(sys.argv) > 1 else "python3", path)
    hf = tokenizers_from_gguf(path)
    hf_ids = [hf.encode(text).ids for text in TEXTS]
    tf = transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)
    tf_ids = [tf(text, add_special_tokens=False)["input_ids"] for text in TEXTS]

    mismatches = [t for t, a, b in zip(TEXTS, expected, hf_ids) if a != b]
    assert not mismatches, f"tokenizers differs from llama.cpp on {mismatches!r}"
    i = TEXTS.index(":\n\n4")
    assert tf_ids[i] != expected[i], "transformers' GGUF tokenizer was expected to miss the digit split"
    differs = [t for t, a, b in zip(TEXTS, expected, tf_ids) if a != b]
    print(f"{len(TEXTS)} texts; transformers' GGUF conversion differs on {len(differs)}: {differs!r}")

    head = {
        "gguf": GGUF_NAME,
        "expected_from": f"llama.cpp via llama-cpp-python {llama_cpp_version}",
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    cases = [
        json.dumps({"text": t, "ids": e, "tokenizers_ids": h, "transformers_gguf_ids": f}, ensure_ascii=False)
        for t, e, h, f in zip(TEXTS, expected, hf_ids, tf_ids)
    ]
    # One case per line, so that a diff shows which text changed.
    OUT.write_text(json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n  ' + ",\n  ".join(cases) + "\n ]\n}\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
