"""The actor of the CartPole example: runs gymnasium's CartPole-v1 with the
newest weights the learner broadcast, and streams every transition to the
learner through a data store.

    python examples/rl_cartpole/actor.py --host LEARNER --port 5555 --broadcast-port 5556

Prints the mean return of recent episodes as it goes; exits after
--seconds, or once the mean return of the last 20 episodes reaches --target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edgeml  # noqa: E402
from learner import make_config  # noqa: E402
from policy import act_logp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--broadcast-port", type=int, default=5556)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--target", type=float, default=195.0, help="stop when the last 20 episodes average this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the episode returns and timings here")
    a = ap.parse_args()

    import gymnasium as gym

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(a.seed)
    local = edgeml.QueuedDataStore(100_000)
    client = edgeml.TrainerClient(a.host, make_config(a.port, a.broadcast_port), data_stores={"transitions": local},
                                  connect_timeout=30.0)
    client.recv_network_callback(lambda w: None)  # keeps client.latest_network() current
    weights = client.latest_network(timeout=30.0)
    client.start_async_update(interval=0.05)

    returns, times, versions = [], [], []
    t0 = time.monotonic()
    episode = 0
    obs, _ = env.reset(seed=a.seed)
    ep_return = 0.0
    last_print = t0
    while time.monotonic() - t0 < a.seconds:
        if client.network_version != (versions[-1] if versions else 0):
            weights = client.latest_network(timeout=0)
        action, logp = act_logp(weights, obs, rng)  # logp lets the learner correct for stale weights
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = bool(terminated or truncated)
        local.insert({"obs": np.asarray(obs, np.float32), "action": int(action), "reward": float(reward),
                      "done": done, "terminated": bool(terminated), "episode": episode, "logp": float(logp)})
        ep_return += reward
        obs = next_obs
        if done:
            returns.append(ep_return)
            times.append(time.monotonic() - t0)
            versions.append(client.network_version)
            episode += 1
            ep_return = 0.0
            obs, _ = env.reset()
            recent = float(np.mean(returns[-20:]))
            if time.monotonic() - last_print > 2.0:
                print(f"actor: {times[-1]:6.1f} s  episode {episode:5d}  mean return (last 20) {recent:6.1f}  "
                      f"weights v{client.network_version}", flush=True)
                last_print = time.monotonic()
            if len(returns) >= 20 and recent >= a.target:
                break
    n_weights = client.network_version
    client.stop()  # sends the transitions not yet sent
    first = float(np.mean(returns[:20])) if returns else 0.0
    last = float(np.mean(returns[-20:])) if returns else 0.0
    print(f"actor: {len(returns)} episodes in {time.monotonic() - t0:.1f} s; mean return first 20 {first:.1f}, "
          f"last 20 {last:.1f}; {n_weights} weight broadcasts received", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"returns": returns, "times": times, "versions": versions, "first20": first,
                       "last20": last}, f)


if __name__ == "__main__":
    main()
