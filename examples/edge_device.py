"""Seed usage 1: an edge device as server. A (simulated) robot serves its
camera image and joint state, takes actions, and streams observations; a
remote machine with the model reads observations and sends actions.

    python examples/edge_device.py                  # both sides, one process
    python examples/edge_device.py --role server --port 6379
    python examples/edge_device.py --role client --host ROBOT_IP --port 6379
"""
import argparse
import threading
import time

import numpy as np

import edgeml


class Robot:
    """Stands in for the hardware: a camera and a 7-joint arm."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.joints = np.zeros(7, np.float32)
        self.actions = 0

    def observe(self, keys):
        full = {"image": self.rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "joints": self.joints.copy()}
        return {k: full[k] for k in keys}

    def act(self, key, action):
        self.joints += np.asarray(action, np.float32)
        self.actions += 1
        return {"status": "received", "actions": self.actions}


def make_config(port, broadcast_port):
    return edgeml.EdgeConfig(port_number=port, action_keys=["move"], observation_keys=["image", "joints"],
                             broadcast_port=broadcast_port)


def serve(port, broadcast_port, ready=None, stop=None):
    robot = Robot()
    server = edgeml.EdgeServer(make_config(port, broadcast_port), robot.observe, robot.act)
    server.start(threaded=True)
    print(f"edge device serving on {server.port}, streaming on {server.broadcast_port}", flush=True)
    if ready is not None:
        ready.put((server.port, server.broadcast_port))
    try:
        while not (stop and stop.is_set()):  # the robot's own loop: stream what the camera sees
            server.publish_observation(robot.observe(["image", "joints"]))
            time.sleep(1 / 30)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def remote(host, port, broadcast_port, steps):
    model_weights = np.full(7, 0.01, np.float32)
    config = make_config(port, broadcast_port)
    with edgeml.EdgeClient(host, port, task_id="reach", config=config) as agent:
        streamed = []
        agent.register_observation_callback(lambda obs: streamed.append(obs["joints"][0]))
        t0 = time.perf_counter()
        for _ in range(steps):
            observation = agent.get_observation()
            prediction = model_weights * float(observation["image"].mean() > 0)  # the "model"
            reply = agent.send_action(prediction)
        dt = time.perf_counter() - t0
        print(f"{steps} observe+act steps in {dt:.3f} s ({dt / steps * 1e3:.2f} ms each); "
              f"last reply {reply}; {len(streamed)} streamed observations received")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["both", "server", "client"], default="both")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--broadcast-port", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    if a.role == "server":
        serve(a.port or 6379, a.broadcast_port or 6380)
    elif a.role == "client":
        remote(a.host, a.port or 6379, a.broadcast_port or 6380, a.steps)
    else:
        import queue
        ready, stop = queue.Queue(), threading.Event()
        t = threading.Thread(target=serve, args=(a.port, a.broadcast_port, ready, stop))
        t.start()
        port, bport = ready.get(timeout=10)
        try:
            remote("127.0.0.1", port, bport, a.steps)
        finally:
            stop.set()
            t.join()


if __name__ == "__main__":
    main()
