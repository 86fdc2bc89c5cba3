"""A small numpy policy-gradient learner for gymnasium's ``CartPole-v1``.

The policy is a two-layer MLP (4 observations -> ``hidden`` tanh units -> 2
action logits, softmax) with a linear value head on the same hidden features
that serves as a baseline. Learning is REINFORCE: the learner buffers whole
episodes, and once ``batch_episodes`` of them are complete it computes the
discounted return-to-go ``G_t`` of every step, takes the advantage
``A_t = G_t - V(s_t)``, normalizes it over the batch, and ascends
``mean_t A_t * log pi(a_t | s_t)`` (plus a small entropy bonus) with Adam, while
regressing the value head towards ``G_t`` (the value loss does not flow into
the shared hidden layer, so the baseline never disturbs the policy features).
Everything is plain numpy with hand-written gradients. The split is meant for
a distributed setup: an *actor* only needs :func:`init_weights`-shaped
weights and :func:`act`; a :class:`Learner` receives transitions in any
batching, regroups them into episodes and produces new weights. On-policy
REINFORCE is used as is; data collected with weights one or two updates stale
is tolerated (the step size is small and gradients are norm-clipped).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Hashable

import numpy as np

__all__ = ["OBS_DIM", "N_ACTIONS", "init_weights", "act", "Learner", "evaluate"]

OBS_DIM = 4
N_ACTIONS = 2
_KEYS = ("w1", "b1", "w2", "b2", "wv", "bv")

Weights = dict[str, np.ndarray]


def init_weights(seed: int = 0, hidden: int = 64) -> Weights:
    """Fresh float32 weights: ``w1`` (4, hidden), ``b1`` (hidden,),
    ``w2`` (hidden, 2), ``b2`` (2,) for the policy and ``wv`` (hidden,),
    ``bv`` (1,) for the value head. The output layers start near zero, so
    the initial policy is close to uniform."""
    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.normal(0.0, 1.0 / np.sqrt(OBS_DIM), (OBS_DIM, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0.0, 0.01, (hidden, N_ACTIONS)),
        "b2": np.zeros(N_ACTIONS),
        "wv": np.zeros(hidden),
        "bv": np.zeros(1),
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _probs(weights: Mapping[str, np.ndarray], obs: np.ndarray) -> np.ndarray:
    h = np.tanh(obs @ weights["w1"] + weights["b1"])
    return np.exp(_log_softmax(h @ weights["w2"] + weights["b2"]))


def act(weights: Mapping[str, np.ndarray], obs: np.ndarray, rng: np.random.Generator) -> int:
    """Sample an action from the softmax policy for one observation (shape (4,))."""
    p = _probs(weights, np.asarray(obs, dtype=np.float32).reshape(OBS_DIM))
    a = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
    return min(a, N_ACTIONS - 1)


def _greedy(weights: Mapping[str, np.ndarray], obs: np.ndarray) -> int:
    return int(np.argmax(_probs(weights, np.asarray(obs, dtype=np.float32).reshape(OBS_DIM))))


def evaluate(weights: Mapping[str, np.ndarray], episodes: int = 10, seed: int = 0,
             greedy: bool = True) -> float:
    """Mean undiscounted return of ``weights`` on ``CartPole-v1`` over
    ``episodes`` episodes (env reset seeds ``seed``, ``seed + 1``, ...).
    Actions are the policy's argmax unless ``greedy`` is False."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    total = 0.0
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            done = False
            while not done:
                a = _greedy(weights, obs) if greedy else act(weights, obs, rng)
                obs, r, terminated, truncated, _ = env.step(a)
                total += float(r)
                done = terminated or truncated
    finally:
        env.close()
    return total / max(episodes, 1)


class _Adam:
    """Adam over a dict of float64 parameter arrays."""

    def __init__(self, params: Mapping[str, np.ndarray], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1.0 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1.0 - self.b2) * g * g
            params[k] -= self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)


class Learner:
    """Buffers transitions into episodes and trains the policy with REINFORCE.

    A transition is a mapping with ``"obs"`` (shape (4,)), ``"action"`` (int),
    ``"reward"`` (float), ``"done"`` (bool, terminated or truncated) and
    ``"episode"`` (int id from the actor); an optional ``"actor"`` key
    (any hashable) keeps episode ids of several actors apart. Transitions of
    one episode must arrive in step order but may be split across any number
    of :meth:`add_transition` calls and interleaved with other episodes.
    """

    def __init__(self, weights: Mapping[str, np.ndarray] | None = None, lr: float = 0.01,
                 gamma: float = 0.99, seed: int = 0, hidden: int = 32,
                 batch_episodes: int = 8, value_lr: float | None = None,
                 entropy_coef: float = 0.0, max_grad_norm: float = 1.0,
                 max_pending: int = 256) -> None:
        """``weights`` default to ``init_weights(seed, hidden)``; ``lr`` is the
        Adam step size of the policy (``value_lr``, default ``lr``, of the
        value head); an update runs once ``batch_episodes`` episodes are
        complete; ``max_pending`` caps the number of unfinished episodes kept
        (the oldest are dropped, e.g. those of an actor that died)."""
        w = init_weights(seed, hidden) if weights is None else weights
        missing = [k for k in _KEYS if k not in w]
        if missing:
            raise KeyError(f"weights lack {missing}")
        self._params = {k: np.array(w[k], dtype=np.float64) for k in _KEYS}
        self.gamma = float(gamma)
        self.batch_episodes = int(batch_episodes)
        self.entropy_coef = float(entropy_coef)
        self.max_grad_norm = float(max_grad_norm)
        self.max_pending = int(max_pending)
        self._pi_opt = _Adam({k: self._params[k] for k in ("w1", "b1", "w2", "b2")}, lr)
        self._v_opt = _Adam({k: self._params[k] for k in ("wv", "bv")},
                            lr if value_lr is None else value_lr)
        self._pending: dict[Hashable, list[tuple[np.ndarray, int, float]]] = {}
        self._complete: list[list[tuple[np.ndarray, int, float]]] = []
        self.updates = 0
        self.episodes_trained = 0
        self.steps_trained = 0
        self.dropped_episodes = 0
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def add_transition(self, t: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Add one transition dict, or a list (any iterable) of them."""
        if isinstance(t, Mapping):
            self._add_one(t)
        else:
            for x in t:
                self._add_one(x)

    add_transitions = add_transition

    def _add_one(self, t: Mapping[str, Any]) -> None:
        key = (t.get("actor"), int(t["episode"]))
        obs = np.asarray(t["obs"], dtype=np.float32).reshape(OBS_DIM)
        action = int(t["action"])
        if not 0 <= action < N_ACTIONS:
            raise ValueError(f"action {action} out of range")
        step = (obs, action, float(t["reward"]))
        ep = self._pending.setdefault(key, [])
        ep.append(step)
        if bool(t["done"]):
            self._complete.append(self._pending.pop(key))
        elif len(self._pending) > self.max_pending:
            # dicts keep insertion order: the first key is the oldest episode
            del self._pending[next(iter(self._pending))]
            self.dropped_episodes += 1

    @property
    def complete_episodes(self) -> int:
        """Number of complete episodes waiting for the next update."""
        return len(self._complete)

    @property
    def pending_episodes(self) -> int:
        """Number of episodes started but not yet finished."""
        return len(self._pending)

    # ---------------------------------------------------------------- weights
    @property
    def weights(self) -> Weights:
        """A fresh float32 copy of the current weights (safe to send or keep)."""
        return {k: v.astype(np.float32) for k, v in self._params.items()}

    # --------------------------------------------------------------- training
    def train(self) -> bool:
        """Run one update on all buffered complete episodes if there are at
        least ``batch_episodes`` of them; return True if the weights changed."""
        if len(self._complete) < self.batch_episodes:
            return False
        episodes, self._complete = self._complete, []

        obs = np.stack([s[0] for ep in episodes for s in ep]).astype(np.float64)
        actions = np.array([s[1] for ep in episodes for s in ep], dtype=np.int64)
        returns = np.concatenate([self._returns_to_go([s[2] for s in ep]) for ep in episodes])
        n = len(actions)

        p = self._params
        h = np.tanh(obs @ p["w1"] + p["b1"])                # (n, H)
        logp = _log_softmax(h @ p["w2"] + p["b2"])           # (n, A)
        probs = np.exp(logp)
        values = h @ p["wv"] + p["bv"][0]                     # (n,)

        adv = returns - values
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)

        # policy loss L = -mean(adv * logp[a]) - c * mean(entropy)
        onehot = np.zeros_like(probs)
        onehot[np.arange(n), actions] = 1.0
        dlogits = -(adv[:, None] * (onehot - probs)) / n
        entropy = -(probs * logp).sum(axis=1)
        if self.entropy_coef:
            # dH/dlogits = -p * (logp + H)
            dlogits += self.entropy_coef * probs * (logp + entropy[:, None]) / n
        dh = (dlogits @ p["w2"].T) * (1.0 - h * h)
        g_pi = {"w1": obs.T @ dh, "b1": dh.sum(axis=0),
                "w2": h.T @ dlogits, "b2": dlogits.sum(axis=0)}
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in g_pi.values())))
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            g_pi = {k: g * (self.max_grad_norm / norm) for k, g in g_pi.items()}

        # value loss 0.5 * mean((V - G)^2), scaled by the return spread so the
        # step size does not depend on episode length; hidden layer frozen
        scale = returns.std() + 1e-8
        dv = (values - returns) / (scale * scale * n)
        g_v = {"wv": h.T @ dv, "bv": np.array([dv.sum()])}

        self._pi_opt.step(p, g_pi)
        self._v_opt.step(p, g_v)

        self.updates += 1
        self.episodes_trained += len(episodes)
        self.steps_trained += n
        self.last_stats = {
            "episodes": float(len(episodes)),
            "mean_return": float(np.mean([sum(s[2] for s in ep) for ep in episodes])),
            "entropy": float(entropy.mean()),
            "grad_norm": norm,
            "value_error": float(np.sqrt(np.mean((values - returns) ** 2))),
        }
        return True

    def _returns_to_go(self, rewards: list[float]) -> np.ndarray:
        out = np.empty(len(rewards))
        g = 0.0
        for i in range(len(rewards) - 1, -1, -1):
            g = rewards[i] + self.gamma * g
            out[i] = g
        return out
