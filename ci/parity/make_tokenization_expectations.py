#!/usr/bin/env python3
"""Tokenize (prompt, completion) examples with stories260K's tokenizer by haloflow's
tokenization contract (documented in stages/ml/src/tokenize.rs), implemented here in Python
with Hugging Face `tokenizers`, and write the ids to
stages/ml/tests/data/stories260k_tokenization.json for the Rust tests to match.

The contract's prompt side is cross-checked against transformers itself: plain prompts
against `AutoTokenizer(text)`, templated ones against `apply_chat_template(tokenize=True)`.

Run from the repository root with the project venv (transformers installed):

    .venv/bin/python ci/parity/make_tokenization_expectations.py
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared/models/stories260K"
OUT = ROOT / "stages/ml/tests/data/stories260k_tokenization.json"

# stories260K has no chat template; the "templated" examples give it this one, which writes
# BOS and EOS as text (so they must be parsed as special tokens, and BOS not doubled).
TEST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def msg(role, content):
    return {"role": role, "content": content}


STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
# (name, format, prompt, completion, max_prompt_length, max_length); formats as in
# stages/ml/src/prompt_format.rs: "plain", "template" (TEST_TEMPLATE), "transcript" (HH-RLHF).
EXAMPLES = [
    ("leading_space", "plain", [msg("user", "Once upon a time")], " there was a little girl.", 64, 128),
    ("no_space", "plain", [msg("user", "Once upon a time,")], "there lived a cat.", 64, 128),
    ("merge_across_boundary", "plain", [msg("user", "Once upon a ti")], "me there was a dog.", 64, 128),
    ("multi_message_plain", "plain", [msg("system", "Tell a story."), msg("user", "About a dog.")], " The dog ran.", 64, 128),
    ("unicode_byte_fallback", "plain", [msg("user", "Lily said")], " «hi» to the 🐶 — café!", 64, 128),
    ("completion_ends_with_eos_text", "plain", [msg("user", "The end")], " of the story.</s>", 64, 128),
    ("newlines", "plain", [msg("user", "Line one.\nLine two.")], "\n\nThe next day, Tom was happy.\n", 64, 128),
    ("truncate_prompt", "plain", [msg("user", STORY)], " One day, she saw a bird.", 8, 128),
    ("truncate_completion", "plain", [msg("user", "Once upon a time")], " " + STORY, 64, 12),
    ("truncate_both", "plain", [msg("user", STORY)], " " + STORY, 6, 10),
    ("empty_completion", "plain", [msg("user", "Once upon a time")], "", 64, 128),
    ("no_room_for_completion", "plain", [msg("user", STORY)], " She smiled.", 16, 16),
    ("templated", "template", [msg("system", "Be kind."), msg("user", "Tell me a story.")], " Once upon a time, a cat sat.", 64, 128),
    ("templated_truncated", "template", [msg("user", STORY)], " The sun was bright.", 10, 14),
    ("transcript", "transcript", [msg("user", "What did Lily see?")], "She saw a bird.", 64, 128),
    ("transcript_multi_turn", "transcript",
     [msg("system", "Tell stories."), msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "A story?")],
     "Once upon a time, a cat sat.", 64, 128),
    ("transcript_reply_starting_with_newline", "transcript", [msg("user", "Two pets?")], "\n1. a dog\n2. a cat", 64, 128),
    ("transcript_truncated", "transcript", [msg("user", STORY)], "The sun was bright.", 10, 14),
]


def prompt_text(hf, fmt, prompt):
    if fmt == "template":
        return hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if fmt == "transcript":
        # Anthropic HH-RLHF's raw form: a system message is the text before the first turn.
        turn = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}
        return "".join(turn[m["role"]] + m["content"] for m in prompt) + "\n\nAssistant:"
    return "\n\n".join(m["content"] for m in prompt)


def reply_text(fmt, completion):
    """The text written after the prompt: a transcript puts one space before the reply."""
    if fmt == "transcript" and completion and not completion[0].isspace():
        return " " + completion
    return completion


def encode_text(tok, bos_token, text):
    add_special = not (bos_token and text.startswith(bos_token))
    return tok.encode(text, add_special_tokens=add_special).ids


def contract(tok, bos_token, eos_id, text, completion, max_prompt_length, max_length):
    """The tokenization contract: joint tokenization, divergence boundary, truncation."""
    if completion == "":
        return {"skip": "empty_text"}
    prompt_ids = encode_text(tok, bos_token, text)
    ids = encode_text(tok, bos_token, text + completion)
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    boundary = 0
    while boundary < min(len(prompt_ids), len(ids)) and prompt_ids[boundary] == ids[boundary]:
        boundary += 1
    prompt_part, completion_part = ids[:boundary], ids[boundary:]
    truncated_prompt = len(prompt_part) > max_prompt_length
    if truncated_prompt:
        prompt_part = prompt_part[len(prompt_part) - max_prompt_length:]
    room = max(max_length - len(prompt_part), 0)
    truncated_completion = len(completion_part) > room
    completion_part = completion_part[:room]
    if not completion_part:
        return {"skip": "no_tokens_left", "prompt_tokens": len(prompt_part)}
    return {
        "ids": prompt_part + completion_part,
        "completion_start": len(prompt_part),
        "truncated_prompt": truncated_prompt,
        "truncated_completion": truncated_completion,
    }


def main():
    if not MODEL.exists():
        sys.exit(f"{MODEL} missing")
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    bos_token, eos_token = config["bos_token"], config["eos_token"]
    tok = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    eos_id = tok.token_to_id(eos_token)

    plain_hf = AutoTokenizer.from_pretrained(str(MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        for f in MODEL.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, tmp)
        templated_config = dict(config, chat_template=TEST_TEMPLATE)
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(templated_config))
        templated_hf = AutoTokenizer.from_pretrained(tmp)

    facts = {"Once upon a time": plain_hf("Once upon a time")["input_ids"]}
    examples = []
    for name, fmt, prompt, completion, max_prompt_length, max_length in EXAMPLES:
        templated = fmt == "template"
        hf = templated_hf if templated else plain_hf
        text = prompt_text(hf, fmt, prompt)
        prompt_ids = encode_text(tok, bos_token, text)
        # The contract's prompt ids are what transformers gives.
        reference = (
            hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
            if templated
            else hf(text)["input_ids"]
        )
        assert prompt_ids == reference, (name, prompt_ids, reference)
        example = {
            "name": name,
            "format": fmt,
            "prompt": prompt,
            "completion": completion,
            "max_prompt_length": max_prompt_length,
            "max_length": max_length,
            "prompt_text": text,
            "prompt_ids": prompt_ids,
            # The completion tokenized on its own, for contrast with the joint contract.
            "separate_completion_ids": tok.encode(completion, add_special_tokens=False).ids,
        }
        example.update(contract(tok, bos_token, eos_id, text, reply_text(fmt, completion), max_prompt_length, max_length))
        examples.append(example)

    out = {
        "generator": "ci/parity/make_tokenization_expectations.py",
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "model": "stories260K",
        "eos_id": eos_id,
        "test_chat_template": TEST_TEMPLATE,
        "facts": facts,
        "examples": examples,
    }
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    skips = sum("skip" in e for e in examples)
    print(f"wrote {len(examples)} examples ({skips} skips) to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
