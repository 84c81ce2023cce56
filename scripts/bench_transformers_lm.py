#!/usr/bin/env python3
"""The Hugging Face transformers side of `fedee bench lm`: the same GGUF file loaded as f32,
the same prompt ids, the same thread count; greedy decoding with the KV cache in a plain loop
(as fedee's). Prints one JSON object.

    python scripts/bench_transformers_lm.py '{"gguf": PATH, "threads": 2, "prompts": {...}, "decode": 128}'
"""

import json
import os
import sys
import time

import torch


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    import transformers
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(cfg["gguf"]))
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    out = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "load_seconds": load_s, "prefill": {}}
    with torch.inference_mode():
        for label, ids in cfg["prompts"].items():
            x = torch.tensor([ids])
            model(input_ids=x)  # warm-up
            best = float("inf")
            for _ in range(cfg.get("reps", 3)):
                t = time.perf_counter()
                model(input_ids=x, use_cache=True)
                best = min(best, time.perf_counter() - t)
            out["prefill"][label] = len(ids) / best
        ids = cfg["prompts"][cfg["decode_after"]]
        o = model(input_ids=torch.tensor([ids]), use_cache=True)
        past = o.past_key_values
        nxt = int(o.logits[0, -1].argmax())
        steps = cfg["decode"]
        t = time.perf_counter()
        for _ in range(steps):
            o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
        out["decode_tokens_per_s"] = steps / (time.perf_counter() - t)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                out["peak_rss_mb"] = int(line.split()[1]) * 1024 / 1e6
    print(json.dumps(out))


if __name__ == "__main__":
    main()
