"""haloflow's tokenization contract in Python, shared by the benchmark peers: prompt + completion
+ EOS tokenized together; the completion starts where the ids diverge from the prompt's ids;
max_prompt_length keeps the prompt's end, then max_length cuts the completion. The prompt is
rendered with the tokenizer's chat template (add_generation_prompt) when it has one; without
one the message contents are joined with blank lines (halo's `--prompt-format plain`). Also the
command line the training peers share."""
import argparse


def peer_arguments(doc):
    """The arguments every training peer takes: DATA MODEL OUT and the step's settings."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--loss", choices=["kto", "dpo"], default="kto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    return ap


def encode(tok, prompt_msgs, completion, max_prompt_length, max_length):
    if tok.chat_template:  # rendered with add_generation_prompt, as haloflow's Tokenizer::prompt_text
        prompt = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in prompt_msgs], tokenize=False, add_generation_prompt=True)
    else:
        prompt = "\n\n".join(m["content"] for m in prompt_msgs)
    p_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + completion)["input_ids"]
    if ids[-1] != tok.eos_token_id:
        ids.append(tok.eos_token_id)
    start = 0
    while start < min(len(p_ids), len(ids)) and p_ids[start] == ids[start]:
        start += 1
    prompt_part, completion_part = ids[:start], ids[start:]
    prompt_part = prompt_part[-max_prompt_length:]
    completion_part = completion_part[: max(0, max_length - len(prompt_part))]
    return prompt_part + completion_part, len(prompt_part)
