"""Flower's SecAgg+ masking cost, for `fedee bench secagg --flower`.

Usage: bench_flower_secagg.py PARAMS [PARAMS ...]

Times the per-mask work of a Flower SecAgg+ client (`pseudo_rand_gen` from
`flwr.common.secure_aggregation.secaggplus_utils`, modulus 2^32, the default) and the
client's masking of one update (quantize to 2^22 over ±8, add the mask mod 2^32) for each
update size. Prints one JSON object. Only the primitives are timed: a whole Flower SecAgg+
round needs Flower's simulation runtime, which is not run here.
"""

import json
import sys
import time

import numpy as np
import flwr
from flwr.common.secure_aggregation import quantization
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen


def best(f, reps=3):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append(time.perf_counter() - t0)
    return min(t)


rows = []
for d in map(int, sys.argv[1:]):
    seed = bytes(range(32))
    x = (np.random.default_rng(0).random(d, dtype=np.float32) - 0.5) * 1e-2
    mask_s = best(lambda: pseudo_rand_gen(seed, 1 << 32, [(d,)]))

    def masked():
        q = quantization.quantize([x], 8.0, 1 << 22)
        m = pseudo_rand_gen(seed, 1 << 32, [(d,)])
        return (q[0] + m[0]) % (1 << 32)

    rows.append({"params": d, "flower_mask_s": mask_s, "flower_quantize_and_mask_s": best(masked)})
print(json.dumps({"flwr": flwr.__version__, "rows": rows}))
