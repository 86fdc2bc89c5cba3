"""The learner of the CartPole example: a TrainerServer that receives the
actors' transitions (data store "transitions"), trains a policy-gradient
policy (policy.py) on whole episodes, and broadcasts the new weights.

    python examples/rl_cartpole/learner.py --port 5555 --broadcast-port 5556

Transitions arrive on the server's thread (data_callback) and are handed to
the training loop, which runs on the main thread, through a queue: the
server keeps serving while the learner computes.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edgeml  # noqa: E402
from policy import Learner, init_weights  # noqa: E402


def make_config(port: int, broadcast_port: int) -> edgeml.TrainerConfig:
    return edgeml.TrainerConfig(port_number=port, broadcast_port=broadcast_port, request_types=["stats"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--broadcast-port", type=int, default=5556)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port-file", help="write 'port broadcast_port' here once serving (for run.py)")
    a = ap.parse_args()

    inbox: "queue.Queue[list]" = queue.Queue()
    learner = Learner(init_weights(seed=a.seed), seed=a.seed)
    stats = {"transitions": 0, "updates": 0, "started": time.time()}

    def data_callback(store_name: str, payload: dict) -> None:
        inbox.put(payload["data"])  # the training loop takes it from here

    def request_callback(rtype: str, payload: object) -> dict:
        return dict(stats, uptime_s=time.time() - stats["started"])

    server = edgeml.TrainerServer(make_config(a.port, a.broadcast_port), data_callback=data_callback,
                                  request_callback=request_callback, host=a.host)
    server.publish_network(learner.weights)  # actors that connect get weights at once
    server.start(threaded=True)
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port} {server.broadcast_port}\n")
        os.replace(tmp, a.port_file)
    print(f"learner: serving on {server.port}, broadcasting weights on {server.broadcast_port}", flush=True)
    try:
        while True:
            try:
                batch = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            batches = [batch]
            while not inbox.empty():
                batches.append(inbox.get_nowait())
            for b in batches:
                for t in b:
                    learner.add_transition(t)
                stats["transitions"] += len(b)
            if learner.train():
                stats["updates"] = learner.updates
                server.publish_network(learner.weights)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
