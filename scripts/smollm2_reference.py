#!/usr/bin/env python3
"""Reference figures for fedee's SmolLM2 loader, tokenizer and chat template.

Run once (needs `pip install transformers gguf` next to torch); writes
model/tests/fixtures/smollm2_reference.json, which the Rust tests compare against. Hugging Face
transformers loads the same GGUF file (dequantized to f32) and tokenizes with the tokenizer it
builds from the GGUF metadata.

    python scripts/smollm2_reference.py data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 16
SUBSET = 512  # fixed vocabulary ids whose logits are kept at every step (besides the top ones)
TOP = 32

TEXTS = [
    "<|im_start|>system\n",
    "2024",
    "Hello, world! It's 3.14159 degrees.",
    "  leading spaces and\ttabs\nnew lines",
    "naïve café — 東京 🙂",
    "The patient's HbA1c was 7.2% on 2023-11-05.",
    "<|im_start|>user\nHi<|im_end|>\n",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "model/tests/fixtures/smollm2_reference.json"
    folder, name = os.path.split(os.path.abspath(path))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = tok(chat, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(1234)
    subset = sorted(torch.randperm(model.config.vocab_size, generator=g)[:SUBSET].tolist())
    steps = []
    ids = list(prompt)
    past = None
    with torch.no_grad():
        inp = torch.tensor([ids])
        for step in range(STEPS + 1):
            o = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[0, -1].double()
            top = torch.topk(logits, TOP)
            nxt = int(top.indices[0])
            steps.append({
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
                "subset_logits": logits[subset].tolist(),
                "logsumexp": float(torch.logsumexp(logits, 0)),
            })
            ids.append(nxt)
            inp = torch.tensor([[nxt]])
    fixture = {
        "made_by": "scripts/smollm2_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf_file": name,
        "texts": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
        "messages": MESSAGES,
        "chat": chat,
        "prompt_ids": prompt,
        "generated_ids": ids[len(prompt):],
        "generated_text": tok.decode(ids[len(prompt):]),
        "subset_ids": subset,
        "steps": steps,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(fixture, f, indent=None, separators=(",", ":"))
    print(f"wrote {out}: prompt {len(prompt)} tokens, generated {fixture['generated_text']!r}")


if __name__ == "__main__":
    main()
