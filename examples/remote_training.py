"""Seed usage 2: remote training. Actors send observations to a trainer and
get weights back (train_step); the trainer also broadcasts weights to every
actor and receives their transitions through a data store.

    python examples/remote_training.py                 # both sides, one process
    python examples/remote_training.py --role server --port 6379
    python examples/remote_training.py --role client --host LEARNER_IP --port 6379

For a real RL loop (CartPole, a policy that learns) see examples/rl_cartpole/.
"""
import argparse
import threading
import time

import numpy as np

import edgeml


def make_config(port, broadcast_port):
    return edgeml.TrainerConfig(port_number=port, broadcast_port=broadcast_port,
                                payload_keys={"observation"}, request_types=["stats"])


def serve(port, broadcast_port, ready=None, stop=None):
    weights = {"w": np.zeros((4, 2), np.float32), "step": 0}
    replay = edgeml.QueuedDataStore(100_000)

    def train_step(payload):
        # one SGD-ish step on the observation; returns the new weights
        weights["w"] += 0.01 * np.outer(payload["observation"], [1.0, -1.0]).astype(np.float32)
        weights["step"] += 1
        return weights

    def stats(rtype, payload):
        return {"steps": weights["step"], "transitions": len(replay)}

    server = edgeml.TrainerServer(make_config(port, broadcast_port), train_step, request_callback=stats)
    server.register_data_store("transitions", replay)
    server.start(threaded=True)
    print(f"trainer serving on {server.port}, broadcasting on {server.broadcast_port}", flush=True)
    if ready is not None:
        ready.put((server.port, server.broadcast_port))
    try:
        while not (stop and stop.is_set()):
            server.publish_network(weights)  # every actor gets the newest weights
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def actor(host, port, broadcast_port, steps):
    config = make_config(port, broadcast_port)
    local = edgeml.QueuedDataStore(10_000)
    trainer = edgeml.TrainerClient(host, config, data_stores={"transitions": local})
    received = []
    trainer.recv_network_callback(lambda w: received.append(w["step"]))
    trainer.start_async_update(interval=0.2)
    rng = np.random.default_rng(0)
    observation = rng.standard_normal(4).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(steps):
        new_weights = trainer.train_step({"observation": observation})
        action = int(np.argmax(observation @ new_weights["w"]))
        local.insert({"observation": observation, "action": action, "reward": 1.0})
        observation = rng.standard_normal(4).astype(np.float32)
    dt = time.perf_counter() - t0
    trainer.stop()  # sends the transitions still pending
    with edgeml.TrainerClient(host, config) as c:
        print(f"{steps} train_steps in {dt:.3f} s ({dt / steps * 1e3:.2f} ms each); "
              f"{len(received)} weight broadcasts received; trainer says {c.request('stats')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["both", "server", "client"], default="both")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--broadcast-port", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    if a.role == "server":
        serve(a.port or 6379, a.broadcast_port or 6380)
    elif a.role == "client":
        actor(a.host, a.port or 6379, a.broadcast_port or 6380, a.steps)
    else:
        import queue
        ready, stop = queue.Queue(), threading.Event()
        t = threading.Thread(target=serve, args=(a.port, a.broadcast_port, ready, stop))
        t.start()
        port, bport = ready.get(timeout=10)
        try:
            actor("127.0.0.1", port, bport, a.steps)
        finally:
            stop.set()
            t.join()


if __name__ == "__main__":
    main()
