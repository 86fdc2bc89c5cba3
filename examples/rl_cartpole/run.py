"""CartPole with edgeml: a learner process and an actor process on this
machine, the actor streaming transitions, the learner training and
broadcasting weights. Shows the episode return climbing.

    pip install gymnasium
    python examples/rl_cartpole/run.py [--seconds 120] [--target 195]

Exit status 0 when the actor's mean return (last 20 episodes) ends at least
--min-improvement times its first 20 episodes' mean.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--target", type=float, default=195.0)
    ap.add_argument("--min-improvement", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "ports")
        result = os.path.join(tmp, "result.json")
        learner = subprocess.Popen([sys.executable, os.path.join(HERE, "learner.py"), "--host", "127.0.0.1",
                                    "--port", "0", "--broadcast-port", "0", "--port-file", port_file,
                                    "--seed", str(a.seed)])
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(port_file):
                if learner.poll() is not None or time.monotonic() > deadline:
                    print("run: the learner did not start", file=sys.stderr)
                    return 2
                time.sleep(0.05)
            port, bport = open(port_file).read().split()
            actor = subprocess.run([sys.executable, os.path.join(HERE, "actor.py"), "--port", port,
                                    "--broadcast-port", bport, "--seconds", str(a.seconds), "--target",
                                    str(a.target), "--seed", str(a.seed + 1), "--json", result])
            if actor.returncode != 0:
                return actor.returncode
        finally:
            learner.send_signal(signal.SIGINT)
            try:
                learner.wait(10)
            except subprocess.TimeoutExpired:
                learner.kill()
        r = json.load(open(result))
    ok = r["last20"] >= a.min_improvement * max(r["first20"], 1.0) or r["last20"] >= a.target
    print(f"run: mean return {r['first20']:.1f} -> {r['last20']:.1f} over {len(r['returns'])} episodes: "
          f"{'improved' if ok else 'NOT improved enough'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
