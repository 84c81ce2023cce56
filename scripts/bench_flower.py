"""Flower's FedAvg aggregation on fedee's update files, for `fedee bench aggregate`.

Usage: bench_flower.py GLOBAL NEXT UPDATE:NUM_EXAMPLES ...

Loads every update (safetensors, F32) as NumPy arrays, as a Flower server holds its clients'
results, then times `flwr.server.strategy.aggregate.aggregate` (weighted average). Prints one
JSON object: load and aggregate seconds, the process's peak RSS, and the largest difference
between Flower's average and fedee's (fedee's next global model minus the global model, since
fedee's updates are deltas).
"""

import json
import resource
import sys
import time

import numpy as np
import flwr
from flwr.server.strategy.aggregate import aggregate


def load(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    arrays = []
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        s, e = info["data_offsets"]
        a = np.fromfile(path, dtype="<f4", count=(e - s) // 4, offset=8 + n + s)
        arrays.append(a.reshape(info["shape"]))
    return arrays


def main():
    global_path, next_path, *updates = sys.argv[1:]
    t = time.perf_counter()
    results = []
    for u in updates:
        path, n = u.rsplit(":", 1)
        results.append((load(path), int(n)))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    mean = aggregate(results)
    agg_s = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    del results
    diff = 0.0
    for g, x, m in zip(load(global_path), load(next_path), mean):
        diff = max(diff, float(np.max(np.abs((x.astype(np.float64) - g) - m))))
    print(json.dumps({
        "flwr_version": flwr.__version__,
        "numpy_version": np.__version__,
        "load_seconds": load_s,
        "aggregate_seconds": agg_s,
        "peak_rss_mb": peak_mb,
        "max_abs_diff_vs_fedee": diff,
    }))


if __name__ == "__main__":
    main()
