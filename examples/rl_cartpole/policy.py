"""A small numpy policy-gradient learner for gymnasium's ``CartPole-v1``.

The policy is a two-layer MLP (4 observations -> ``hidden`` tanh units -> 2
action logits, softmax), trained with REINFORCE: the :class:`Learner` regroups
incoming transitions into whole episodes, and once ``batch_episodes`` of them
are complete it computes the discounted return-to-go ``G_t`` of every step,
normalizes those returns over the batch (zero mean, unit variance, which acts
as a baseline), and ascends ``mean_t G_t * log pi(a_t | s_t)`` plus a small
entropy bonus with a hand-written numpy Adam and global gradient-norm
clipping. It is made to be split in two: an *actor* needs only the weights
(a plain ``dict`` of float32 arrays) and :func:`act`; the learner receives
transitions in any batching and produces new weights. Data collected with
weights one or two updates stale is tolerated by the small step size; if the
actor also records the log-probability of each action it took
(:func:`act_logp`, key ``"logp"``), the learner reweights each step by the
ratio pi/pi_old with PPO's clipping, which removes the staleness bias.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["N_ACTIONS", "OBS_DIM", "Learner", "act", "act_logp", "evaluate", "init_weights"]

OBS_DIM = 4
N_ACTIONS = 2
_KEYS = ("w1", "b1", "w2", "b2")

Weights = dict[str, np.ndarray]


def init_weights(seed: int = 0, hidden: int = 64) -> Weights:
    """Fresh float32 weights ``w1`` (4, hidden), ``b1`` (hidden,),
    ``w2`` (hidden, 2), ``b2`` (2,). The output layer starts near zero, so the
    initial policy is close to uniform."""
    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.normal(0.0, 1.0 / np.sqrt(OBS_DIM), (OBS_DIM, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0.0, 0.01, (hidden, N_ACTIONS)),
        "b2": np.zeros(N_ACTIONS),
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _probs(weights: Mapping[str, np.ndarray], obs: np.ndarray) -> np.ndarray:
    h = np.tanh(obs @ weights["w1"] + weights["b1"])
    return np.exp(_log_softmax(h @ weights["w2"] + weights["b2"]))


def act_logp(weights: Mapping[str, np.ndarray], obs: np.ndarray,
             rng: np.random.Generator) -> tuple[int, float]:
    """Like :func:`act`, but also return the log-probability of the chosen
    action under ``weights``; an actor that puts it in the transition as
    ``"logp"`` lets the :class:`Learner` correct for stale weights."""
    h = np.tanh(np.asarray(obs, dtype=np.float32).reshape(OBS_DIM) @ weights["w1"] + weights["b1"])
    logp = _log_softmax(h @ weights["w2"] + weights["b2"])
    cdf = np.cumsum(np.exp(logp))
    a = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), N_ACTIONS - 1)
    return a, float(logp[a])


def act(weights: Mapping[str, np.ndarray], obs: np.ndarray, rng: np.random.Generator) -> int:
    """Sample an action from the softmax policy for one observation (shape (4,))."""
    return act_logp(weights, obs, rng)[0]


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

    def __init__(self, weights: Mapping[str, np.ndarray] | None = None, lr: float = 0.002,
                 gamma: float = 0.99, seed: int = 0, hidden: int = 64,
                 batch_episodes: int = 8, entropy_coef: float = 0.01, max_grad_norm: float = 1.0,
                 max_pending: int = 256, clip_ratio: float = 0.2) -> None:
        """``weights`` default to ``init_weights(seed, hidden)`` (``seed`` is
        used for nothing else: training itself draws no random numbers);
        ``lr`` is Adam's step size; an update runs once ``batch_episodes``
        episodes are complete; ``entropy_coef`` weighs the entropy bonus;
        gradients are clipped to global norm ``max_grad_norm`` (0: off);
        ``clip_ratio`` is PPO's epsilon, used only for steps that carry
        ``"logp"``; ``max_pending`` caps the number of unfinished episodes
        kept (the oldest are dropped, e.g. those of an actor that died)."""
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
        self.clip_ratio = float(clip_ratio)
        self._opt = _Adam(self._params, lr)
        self._pending: dict[Hashable, list[tuple[np.ndarray, int, float, float]]] = {}
        self._complete: list[list[tuple[np.ndarray, int, float, float]]] = []
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
        logp = t.get("logp")
        step = (obs, action, float(t["reward"]), np.nan if logp is None else float(logp))
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
        old_logp = np.array([s[3] for ep in episodes for s in ep])
        returns = np.concatenate([self._returns_to_go([s[2] for s in ep]) for ep in episodes])
        n = len(actions)

        p = self._params
        h = np.tanh(obs @ p["w1"] + p["b1"])                 # (n, hidden)
        logp = _log_softmax(h @ p["w2"] + p["b2"])            # (n, 2)
        probs = np.exp(logp)
        adv = (returns - returns.mean()) / (returns.std() + 1e-8)

        # loss L = -mean(w * adv * logp[a]) - c * mean(entropy), where w
        # is 1 (plain REINFORCE) unless the actor sent its "logp": then w is
        # the ratio pi/pi_old, zeroed where PPO's clipped objective is flat
        logp_a = logp[np.arange(n), actions]
        ratio = np.exp(np.clip(logp_a - np.where(np.isnan(old_logp), logp_a, old_logp), -20, 20))
        w = ratio
        if self.clip_ratio > 0:
            flat = ((adv > 0) & (ratio > 1 + self.clip_ratio)) | ((adv < 0) & (ratio < 1 - self.clip_ratio))
            w = np.where(flat, 0.0, ratio)
        onehot = np.zeros_like(probs)
        onehot[np.arange(n), actions] = 1.0
        dlogits = -((w * adv)[:, None] * (onehot - probs)) / n
        entropy = -(probs * logp).sum(axis=1)
        if self.entropy_coef:
            # dH/dlogits = -p * (logp + H)
            dlogits += self.entropy_coef * probs * (logp + entropy[:, None]) / n
        dh = (dlogits @ p["w2"].T) * (1.0 - h * h)
        g = {"w1": obs.T @ dh, "b1": dh.sum(axis=0),
             "w2": h.T @ dlogits, "b2": dlogits.sum(axis=0)}
        norm = float(np.sqrt(sum(float((x * x).sum()) for x in g.values())))
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            g = {k: x * (self.max_grad_norm / norm) for k, x in g.items()}

        self._opt.step(p, g)

        self.updates += 1
        self.episodes_trained += len(episodes)
        self.steps_trained += n
        self.last_stats = {
            "episodes": float(len(episodes)),
            "mean_return": float(np.mean([sum(s[2] for s in ep) for ep in episodes])),
            "entropy": float(entropy.mean()),
            "grad_norm": norm,
            "mean_ratio": float(ratio.mean()),
            "clipped": float((w == 0).mean()),
        }
        return True

    def _returns_to_go(self, rewards: list[float]) -> np.ndarray:
        out = np.empty(len(rewards))
        g = 0.0
        for i in range(len(rewards) - 1, -1, -1):
            g = rewards[i] + self.gamma * g
            out[i] = g
        return out
