"""Time to first token and inter-token latency through `fedee chat-proxy`, as an OpenAI
client sees them (streaming, greedy). Run by `fedee bench lm`; prints one JSON object.

Usage: python scripts/bench_proxy_latency.py '{"base_url": URL, "model": ID, "requests": N,
"max_tokens": M}'
"""

import json
import sys
import time

import openai

cfg = json.loads(sys.argv[1])
base_url, model, requests, max_tokens = cfg["base_url"], cfg["model"], cfg["requests"], cfg["max_tokens"]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
prompt = "Write a short note for a patient starting metformin for type 2 diabetes."
ttft, gaps, tokens = [], [], []
for _ in range(requests):
    t0 = time.perf_counter()
    arrivals = []
    usage = None
    for ch in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        temperature=0,
        max_tokens=max_tokens,
        stream_options={"include_usage": True},
    ):
        if ch.usage:
            usage = ch.usage
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
    ttft.append(arrivals[0])
    gaps.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
    tokens.append(usage.completion_tokens if usage else None)
print(json.dumps({"ttft_s": ttft, "inter_token_s": gaps, "completion_tokens": tokens,
                  "prompt_tokens": usage.prompt_tokens if usage else None}))
