"""edgeml demo: an inference server in its own process, a client calling it.

Shows what edgeml does in a few lines: numpy arrays in and out, a handler
error reported to the caller, an unknown interface, a timeout, several
threads sharing one client, and round-trip times (p50/p99) for a small
payload, a 128x128x3 camera image and a 4 MB array.

    python examples/demo.py [--iterations N]
"""
import argparse
import multiprocessing as mp
import threading
import time

import numpy as np

import edgeml


def serve(port_queue, stop_event):
    """The GPU box: serves three interfaces until told to stop."""
    def classify(payload):
        img = payload["image"]
        return {"label": int(img.mean()) % 10, "score": float(img.std()), "shape": img.shape}

    def echo(payload):
        return payload

    def slow(payload):
        time.sleep(payload.get("seconds", 1.0))
        return {"done": True}

    def broken(payload):
        raise ValueError("the model expects 3 channels, got %d" % payload["channels"])

    server = edgeml.InferenceServer(0, host="127.0.0.1")
    for name, fn in [("classify", classify), ("echo", echo), ("slow", slow), ("broken", broken)]:
        server.register_interface(name, fn)
    server.start(threaded=True)
    port_queue.put(server.port)
    stop_event.wait()
    server.stop()


def percentiles(samples_s):
    a = np.array(samples_s) * 1e6
    return f"p50 {np.percentile(a, 50):8.1f} us   p99 {np.percentile(a, 99):8.1f} us   (n={len(a)})"


def timed(client, name, payload, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.call(name, payload)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=500)
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    port_queue, stop_event = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(port_queue, stop_event))
    proc.start()
    port = port_queue.get(timeout=30)
    print(f"server: InferenceServer in process {proc.pid} on 127.0.0.1:{port}")

    try:
        with edgeml.InferenceClient("127.0.0.1", port, timeout=10) as client:
            print("interfaces:", client.interfaces())

            image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
            print("classify a 128x128x3 image ->", client.call("classify", {"image": image}))

            weights = {"layer1": np.ones((256, 256), np.float32), "step": 7, "tags": ("a", "b")}
            back = client.call("echo", weights)
            print("echo keeps types ->", {k: (type(v).__name__, getattr(v, "shape", v)) for k, v in back.items()})

            try:
                client.call("broken", {"channels": 1})
            except edgeml.RemoteError as e:
                print(f"handler error reaches the caller -> RemoteError: {e.remote_type}: {e.remote_message}")
            try:
                client.call("clasify", {})
            except edgeml.UnknownInterfaceError as e:
                print("unknown interface ->", e)
            try:
                client.call("slow", {"seconds": 2.0}, timeout=0.2)
            except edgeml.EdgeMLTimeoutError as e:
                print("timeout ->", e)

            results = []
            threads = [threading.Thread(target=lambda i=i: results.append(client.call("echo", {"t": i})))
                       for i in range(8)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            print(f"8 threads shared one client -> {len(results)} replies")

            n = args.iterations
            print("\nround trips (client and server in separate processes, loopback):")
            print("  64 B payload      ", percentiles(timed(client, "echo", {"x": b"\0" * 64}, n)))
            print("  128x128x3 image   ", percentiles(timed(client, "echo", {"image": image}, n)))
            big = np.ones(1 << 20, np.float32)
            print("  4 MB float32 array", percentiles(timed(client, "echo", {"x": big}, max(20, n // 10))))
    finally:
        stop_event.set()
        proc.join(10)
    print("\nserver stopped; done.")


if __name__ == "__main__":
    main()
