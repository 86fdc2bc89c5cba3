"""The examples run: each seed usage end to end in one process."""
import os
import subprocess
import sys

import pytest

from conftest import scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(*args, timeout=60):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=scaled(timeout))
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.timeout(120)
def test_edge_device_example():
    out = run_example("examples/edge_device.py", "--steps", "50")
    assert "50 observe+act steps" in out and "'actions': 50" in out


@pytest.mark.timeout(120)
def test_remote_training_example():
    out = run_example("examples/remote_training.py", "--steps", "100")
    assert "100 train_steps" in out and "'transitions': 100" in out


@pytest.mark.timeout(120)
def test_remote_inference_example():
    out = run_example("examples/remote_inference.py", "--calls", "20")
    assert "20 calls" in out and "as expected: no interface 'face_reg'" in out


@pytest.mark.timeout(180)
def test_bench_digits_example(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skl2onnx")
    out = run_example("examples/bench_digits.py", "--out", str(tmp_path), "--limit", "100", timeout=150)
    assert "== fp32 against int8" in out and "accuracy" in out
    for name in ("fp32", "int8"):
        assert os.path.exists(tmp_path / name / "report.html")
    assert os.path.exists(tmp_path / "compare" / "compare.md")


@pytest.mark.timeout(180)
def test_offload_cnn_example(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = run_example("examples/offload_cnn.py", "--model", str(tmp_path / "cnn.onnx"), "--size", "64",
                      "--inferences", "5", timeout=150)
    assert "chosen: p=" in out and "outputs equal the whole model's" in out
