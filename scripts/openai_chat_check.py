"""Drive `fedee chat-proxy` with the official `openai` Python client and print what came back
as one JSON object (tests/chat_proxy.rs checks it against the plaintext model).

Usage: python scripts/openai_chat_check.py BASE_URL MODEL PROMPT [--short N]

--short N: only a greedy completion and a greedy stream (with usage) of N tokens each (for a
slow backend such as HSS-EE).
"""

import json
import sys
import time

import openai

base_url, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
short = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--short" else None
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
messages = [{"role": "user", "content": prompt}]
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]


def complete(**kw):
    r = client.chat.completions.create(model=model, messages=messages, **kw)
    c = r.choices[0]
    return {
        "object": r.object,
        "role": c.message.role,
        "content": c.message.content,
        "finish_reason": c.finish_reason,
        "usage": r.usage.model_dump(),
    }


def stream(**kw):
    t0 = time.perf_counter()
    chunks, arrivals = [], []
    for ch in client.chat.completions.create(model=model, messages=messages, stream=True, **kw):
        arrivals.append(time.perf_counter() - t0)
        chunks.append(ch.model_dump())
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return {
        "objects": sorted({c["object"] for c in chunks}),
        "first_role": deltas[0].get("role") if deltas else None,
        "content": "".join(d.get("content") or "" for d in deltas),
        "pieces": [d.get("content") for d in deltas if d.get("content")],
        "finish_reasons": [f for f in finish if f],
        "usage": usage,
        "chunks": len(chunks),
        "first_content_s": next(
            (t for t, c in zip(arrivals, chunks) if c["choices"] and c["choices"][0]["delta"].get("content")),
            None,
        ),
    }


greedy = {"temperature": 0, "max_tokens": short or 40}
out["plain"] = complete(**greedy)
out["stream"] = stream(**greedy, stream_options={"include_usage": True})
if short:
    print(json.dumps(out))
    sys.exit(0)
out["stream_no_usage"] = stream(**greedy)
out["length"] = complete(temperature=0, max_tokens=3)
out["stop"] = complete(**greedy, stop=["Paris"])
out["stream_stop"] = stream(**greedy, stop=[" of"])
sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 42, "max_tokens": 24}
out["sampled"] = [complete(**sampled)["content"] for _ in range(2)]
out["sampled_other_seed"] = complete(**{**sampled, "seed": 7})["content"]

errors = {}
for name, kw in {
    "temperature": {"temperature": 5},
    "n": {"n": 2},
    "max_tokens": {"max_tokens": 0},
    "model": {"model": "gpt-4o"},
    "role": {"messages": [{"role": "tool", "content": "x"}]},
}.items():
    args = {"model": model, "messages": messages, "max_tokens": 4, **kw}
    try:
        client.chat.completions.create(**args)
        errors[name] = None
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "body": e.body}
out["errors"] = errors
print(json.dumps(out))
