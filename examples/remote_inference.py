"""Seed usage 3: a weak device sends its input to a GPU (or any) machine and
gets the prediction back.

    python examples/remote_inference.py                 # both sides, one process
    python examples/remote_inference.py --role server --port 6379
    python examples/remote_inference.py --role client --host GPU_IP --port 6379
"""
import argparse
import threading
import time

import numpy as np

import edgeml


def serve(port, ready=None, stop=None):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16000, 10)).astype(np.float32)  # a stand-in "voice model"

    def predict(payload):
        audio = np.asarray(payload["audio"], np.float32)
        logits = audio @ w
        return {"prediction": int(np.argmax(logits)), "logits": logits}

    server = edgeml.InferenceServer(port_num=port)
    server.register_interface("voice_reg", predict)
    server.start(threaded=True)
    print(f"inference server on {server.port} serving {server.interfaces}", flush=True)
    if ready is not None:
        ready.put(server.port)
    try:
        while not (stop and stop.is_set()):
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def device(host, port, calls):
    client = edgeml.InferenceClient(host, port)
    print("server interfaces:", client.interfaces())
    audio = np.random.default_rng(1).standard_normal(16000).astype(np.float32)  # 1 s at 16 kHz
    t0 = time.perf_counter()
    for _ in range(calls):
        res = client.call("voice_reg", {"audio": audio})
    dt = time.perf_counter() - t0
    print(f"{calls} calls in {dt:.3f} s ({dt / calls * 1e3:.2f} ms each); prediction {res['prediction']}")
    try:
        client.call("face_reg", {"image": b""})
    except edgeml.UnknownInterfaceError as e:
        print("as expected:", e)
    client.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["both", "server", "client"], default="both")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--calls", type=int, default=100)
    a = ap.parse_args()
    if a.role == "server":
        serve(a.port or 6379)
    elif a.role == "client":
        device(a.host, a.port or 6379, a.calls)
    else:
        import queue
        ready, stop = queue.Queue(), threading.Event()
        t = threading.Thread(target=serve, args=(a.port, ready, stop))
        t.start()
        port = ready.get(timeout=10)
        try:
            device("127.0.0.1", port, a.calls)
        finally:
            stop.set()
            t.join()


if __name__ == "__main__":
    main()
