"""PyTorch eager side of `fedee bench train`: one train step of the same model as fedee's
(same architecture, batch, dtype, optimizer and thread count), timed in Python.

Usage: bench_torch_train.py CONFIG_JSON   (written by `fedee bench train`)
Prints one JSON object: the median step time over the requested repetitions.
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Layer(nn.Module):
    """One BERT encoder layer, as fedee_model::bert::encode computes it (no dropout)."""

    def __init__(self, h, heads, inter, eps):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out, self.ln1 = nn.Linear(h, h), nn.LayerNorm(h, eps=eps)
        self.inter, self.out, self.ln2 = nn.Linear(h, inter), nn.Linear(inter, h), nn.LayerNorm(h, eps=eps)

    def forward(self, x, ext):
        b, t, h = x.shape
        hd = h // self.heads

        def split(z):
            return z.view(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) * (1.0 / hd ** 0.5) + ext
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).contiguous().view(b, t, h)
        x = self.ln1(self.attn_out(ctx) + x)
        return self.ln2(self.out(F.gelu(self.inter(x))) + x)


class BertClassifier(nn.Module):
    def __init__(self, c, labels):
        super().__init__()
        h, eps = c["hidden_size"], c["layer_norm_eps"]
        self.word = nn.Embedding(c["vocab_size"], h)
        self.pos = nn.Embedding(c["max_position_embeddings"], h)
        self.typ = nn.Embedding(c["type_vocab_size"], h)
        self.ln = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(
            Layer(h, c["num_attention_heads"], c["intermediate_size"], eps)
            for _ in range(c["num_hidden_layers"])
        )
        self.cls = nn.Linear(h, labels)

    def forward(self, ids, mask):
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device)
        x = self.ln(self.word(ids) + self.pos(pos).unsqueeze(0) + self.typ.weight[0])
        ext = ((1.0 - mask.to(x.dtype)) * torch.finfo(x.dtype).min).view(b, 1, 1, t)
        for layer in self.layers:
            x = layer(x, ext)
        m = mask.to(x.dtype).unsqueeze(-1)
        return self.cls((x * m).sum(1) / m.sum(1).clamp_min(1e-9))


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    torch.manual_seed(0)
    arch, n = cfg["arch"], cfg["batch"]
    c = arch["config"]
    if arch["architecture"] == "mlp":
        if c["activation"] != "relu":
            raise SystemExit(f"activation {c['activation']} not mirrored here")
        dims = [c["in_features"], *c["hidden"], c["out_features"]]
        layers = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
        model = nn.Sequential(*layers).to(dev)
        x = torch.randn(n, c["in_features"], device=dev)
        y = torch.randint(c["out_features"], (n,), device=dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def forward():
            return model(x)
    else:
        model = BertClassifier(c["bert"], c["num_labels"]).to(dev)
        t = cfg["seq_len"]
        ids = torch.randint(c["bert"]["vocab_size"], (n, t), device=dev)
        mask = torch.ones(n, t, dtype=torch.long, device=dev)
        y = torch.randint(c["num_labels"], (n,), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

        def forward():
            return model(ids, mask)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(forward(), y)
        loss.backward()
        opt.step()

    times = []
    for r in range(cfg["reps"] + 2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if r >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "model": cfg["model"],
        "step_seconds": statistics.median(times),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
