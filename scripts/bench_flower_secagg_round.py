"""A whole Flower SecAgg+ round, for `fedee bench secagg --flower-rounds`.

Usage: bench_flower_secagg_round.py SITES PARAMS NUM_SHARES [DROPOUT]

Runs one FedAvg round of SITES virtual clients in Flower's simulation runtime (Ray), each
returning a float32 update of PARAMS values, once with `SecAggPlusWorkflow` (num_shares
NUM_SHARES, reconstruction threshold a strict majority, the client `secaggplus_mod`) and once
plain, and prints one JSON object with the wall time of each round as the ServerApp sees it
(the runtime's start-up is not counted).

DROPOUT (default 0): that fraction of the clients, spread over the partition ids as in
`fedee bench secagg`, drop out after sharing keys: a client mod raises when the
collect-masked-vectors stage reaches them, which Flower's workflow counts as a dropped node
(its pairwise masks are then rebuilt from the survivors' shares in the unmask stage). The
plain round keeps every client: an upper bound on a plain round without the dropped ones, so
the time SecAgg+ adds is not overstated.
"""

import json
import sys
import time

import numpy as np
import flwr
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, MessageType, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation

n, d, shares = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dropout = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
n_dropped = round(dropout * n)
step = max(n // n_dropped, 1) if n_dropped else 1
dropped = {i for i in range(n) if n_dropped and i % step == 0 and i // step < n_dropped}


def dropout_mod(msg, ctxt, call_next):
    """Drop the chosen clients after they shared keys."""
    if msg.metadata.message_type == MessageType.TRAIN and int(ctxt.node_config["partition-id"]) in dropped:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            raise RuntimeError("dropped out (benchmark)")
    return call_next(msg, ctxt)


class Client(NumPyClient):
    def __init__(self, cid):
        self.cid = cid

    def fit(self, parameters, config):
        rng = np.random.default_rng(self.cid)
        return [(rng.random(d, dtype=np.float32) - 0.5) * 1e-2], 100, {}


def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()


def round_seconds(secure):
    times = []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]),
        )
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        if secure:
            wf = DefaultWorkflow(
                fit_workflow=SecAggPlusWorkflow(
                    num_shares=shares, reconstruction_threshold=shares // 2 + 1, timeout=3600
                )
            )
        else:
            wf = DefaultWorkflow()
        t = time.perf_counter()
        wf(grid, ctx)
        times.append(time.perf_counter() - t)

    client = ClientApp(client_fn=client_fn, mods=[dropout_mod, secaggplus_mod] if secure else [])
    run_simulation(
        server_app=app,
        client_app=client,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return times[0]


print(
    json.dumps(
        {
            "flwr": flwr.__version__,
            "sites": n,
            "params": d,
            "num_shares": shares,
            "dropout": dropout,
            "dropped": len(dropped),
            "secure_round_s": round_seconds(True),
            "plain_round_s": round_seconds(False),
        }
    )
)
