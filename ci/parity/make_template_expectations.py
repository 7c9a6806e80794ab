#!/usr/bin/env python3
"""Render the chat templates in stages/ml/tests/data/templates/ with transformers' own
`apply_chat_template(..., tokenize=False)` and write what it produces to
stages/ml/tests/data/templates/expected.json, which the Rust tests compare byte for byte.

Run from the repository root with the project venv (transformers installed):

    .venv/bin/python ci/parity/make_template_expectations.py

The tokenizer behind `apply_chat_template` is stories260K's (any tokenizer.json works: with
tokenize=False only its special-token map reaches the template, and this script sets that
map per model).
"""

import json
import sys
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "stages/ml/tests/data/templates"
TOKENIZER_JSON = ROOT.parent / "shared/models/stories260K/tokenizer.json"

# The special tokens each model's tokenizer_config.json defines (None: not defined).
MODELS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama31": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2": {"bos_token": None, "eos_token": "<|im_end|>"},
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>"},
}


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are a terse assistant.")
CONVERSATIONS = {
    "single_user": [msg("user", "Hi")],
    "system_user": [SYSTEM, msg("user", "What is 2 + 2?")],
    "multi_turn": [
        SYSTEM,
        msg("user", "Name a prime."),
        msg("assistant", "7"),
        msg("user", "Another one?"),
    ],
    "no_system_multi_turn": [
        msg("user", "Name a prime."),
        msg("assistant", "7"),
        msg("user", "Another one?"),
    ],
    "ends_with_assistant": [
        msg("user", "Say hello."),
        msg("assistant", "Hello!"),
    ],
    "special_characters": [
        msg("system", "Quote <tags> & \"double\" and 'single' quotes verbatim."),
        msg("user", "Is 3 < 5 && 5 > 3? Answer with <b>yes</b> or \"no\"."),
        msg("assistant", "<b>yes</b> & that's \"true\""),
    ],
    "unicode": [msg("user", "naïve café — 日本語のテキスト 🤗 Ünïcödé ß ∑ \u00a0nbsp")],
    "newlines_and_spaces": [
        msg("system", "  padded system  \n"),
        msg("user", "line one\nline two\n\n    indented line\n\ttab\n"),
        msg("assistant", "\n\nleading newlines and trailing spaces   "),
        msg("user", "{{ not a template }} {% neither %} {# nor this #}"),
    ],
    "empty_content": [msg("user", "")],
}

# Tool schemas as transformers passes them (JSON schema dicts); they exercise `tojson`:
# HTML-significant characters, non-ASCII, numbers, booleans, null and nesting.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city. Use <city> & 'units' \"exactly\"; café ☀",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
                    "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 3},
                    "threshold": {"type": "number", "default": 0.5, "nullable": True},
                    "extra": {"type": "object", "properties": {}, "default": None},
                    "tags": {"type": "array", "items": {"type": "string"}, "default": []},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "noop",
            "description": "Does nothing.\nSecond line.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

TOOL_CONVERSATIONS = {
    "tools_single_user": [msg("user", "Weather in Zürich?")],
    "tools_system_user": [SYSTEM, msg("user", "Weather in <Paris> & Lyon?")],
    # Llama 3.1 puts the tools into the first user message; with none it raises.
    "tools_system_only": [SYSTEM],
}


def make_tokenizer(special_tokens):
    tokens = {k: v for k, v in special_tokens.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON), **tokens)


def render(tokenizer, template, messages, tools, add_generation_prompt):
    try:
        rendered = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return {"rendered": rendered}
    except Exception as e:  # the template's own raise_exception
        return {"error": str(e)}


def main():
    if not TOKENIZER_JSON.exists():
        sys.exit(f"{TOKENIZER_JSON} missing")
    cases = []
    for model, special_tokens in MODELS.items():
        template = (TEMPLATES / f"{model}.jinja").read_text(encoding="utf-8")
        tokenizer = make_tokenizer(special_tokens)
        conversations = [(name, conv, None) for name, conv in CONVERSATIONS.items()]
        if "tools" in template:
            conversations += [(name, conv, TOOLS) for name, conv in TOOL_CONVERSATIONS.items()]
        for name, messages, tools in conversations:
            for add_generation_prompt in (True, False):
                case = {
                    "template": model,
                    "conversation": name,
                    **special_tokens,
                    "add_generation_prompt": add_generation_prompt,
                    "messages": messages,
                    "tools": tools,
                }
                case.update(render(tokenizer, template, messages, tools, add_generation_prompt))
                cases.append(case)
    out = {
        "generator": "ci/parity/make_template_expectations.py",
        "transformers": transformers.__version__,
        "cases": cases,
    }
    path = TEMPLATES / "expected.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    errors = sum("error" in c for c in cases)
    print(f"wrote {len(cases)} cases ({errors} template errors) to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
