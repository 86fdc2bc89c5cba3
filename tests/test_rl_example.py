"""The RL example learns: a CartPole actor process streams transitions to a
learner process, which trains and broadcasts weights; the actor's episode
return must clearly improve (a short run of examples/rl_cartpole/run.py)."""
import os
import subprocess
import sys

import pytest

from conftest import scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_cartpole_actor_learner_improves():
    p = subprocess.run([sys.executable, "examples/rl_cartpole/run.py", "--seconds", str(scaled(90)),
                        "--target", "150", "--min-improvement", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=scaled(240))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "improved" in p.stdout and "weight broadcasts received" in p.stdout
