"""examples/notebooks: executed in a real Jupyter kernel with nbclient, as a
user would run it, then with the server and edge cells run a second time
(a notebook's usual life: re-running the cell that starts a server on a
fixed port)."""
import os
import socket

import pytest

from conftest import scaled

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install -e '.[test]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "notebooks", "edge_inference.ipynb")

pytestmark = pytest.mark.timeout(300)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged(nb, tag):
    [(i, cell)] = [(i, c) for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]
    return i, cell


def outputs(cell, kind):
    """The data of every output of ``cell`` with MIME type ``kind``."""
    found = []
    for out in cell.get("outputs", []):
        if out.get("output_type") in ("execute_result", "display_data") and kind in out.get("data", {}):
            found.append(out["data"][kind])
    return found


def stream(cell, name):
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == name)


def test_notebook_runs_and_its_server_cell_can_be_run_again(monkeypatch, tmp_path):
    port = free_port()
    monkeypatch.setenv("EDGEML_NOTEBOOK_PORT", str(port))  # the kernel inherits it
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own default (inline)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=int(scaled(120)), kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)  # raises CellExecutionError, with the traceback, on an error

        _, server_cell = tagged(nb, "server")
        assert any("InferenceServer" in t for t in outputs(server_cell, "text/plain"))
        _, edge = tagged(nb, "edge")
        assert "round trip p50" in stream(edge, "stdout")
        [stats] = outputs(edge, "text/html")  # client.stats() as a table
        assert "<table" in stats and "rtt (ms)" in stats and "200 calls" in stats
        _, plot = tagged(nb, "plot")
        assert len(outputs(plot, "image/png")) == 1
        _, prof = tagged(nb, "profile")
        [page] = outputs(prof, "text/html")
        assert "<table" in page and ">infer<" in page and "100 samples, 0 errors" in page
        assert "data:image/png;base64," in page
        assert "100/100" in stream(prof, "stderr")  # tqdm's bar (its widget, where ipywidgets is)
        _, timeline = tagged(nb, "timeline")
        assert len(outputs(timeline, "image/png")) == 1
        _, own = tagged(nb, "own-plot")
        assert len(outputs(own, "image/png")) == 1  # plt.show() still shows after a profile run
        assert not stream(own, "stderr")

        # run the server cell again, then the edge cell, as a user would
        stop_i, stop = tagged(nb, "stop")
        assert "stop()" in stop.source
        for tag in ("server", "edge", "server", "edge"):
            i, cell = tagged(nb, tag)
            client.execute_cell(cell, i)
        _, edge = tagged(nb, "edge")
        assert "round trip p50" in stream(edge, "stdout")
        # the server cell only reports the one server, and the port is the fixed one
        _, server_cell = tagged(nb, "server")
        assert any(str(port) in t for t in outputs(server_cell, "text/plain"))
        client.execute_cell(stop, stop_i)
    # stop freed the fixed port: nothing listens there (closed connections
    # may linger in TIME_WAIT, which SO_REUSEADDR allows, as servers set it)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_notebook_is_clean_on_disk():
    """Committed without outputs (nothing stale to read, small diffs), valid
    nbformat, every cell tagged that the test above relies on."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None
    tags = {t for c in nb.cells for t in c.metadata.get("tags", [])}
    assert {"server", "edge", "plot", "profile", "timeline", "own-plot", "stop"} <= tags
