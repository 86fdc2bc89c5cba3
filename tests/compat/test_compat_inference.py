"""agentlace's and the original edgeml's inference server/client, as their
tests and READMEs use them, with only the import changed to edgeml."""
import threading

import pytest

import edgeml
from conftest import scaled

pytestmark = pytest.mark.timeout(60)


def echo(payload: dict) -> dict:
    return {"status": "ok", "message": payload}


def greet(payload: dict) -> dict:
    name = payload.get("name")
    if name:
        return {"status": "ok", "message": f"Hello, {name}!"}
    return {"status": "error", "message": "Name not provided"}


@pytest.mark.parametrize("module", ["edgeml.inference", "edgeml.interfaces"])
def test_agentlace_test_inference(module, cleanup):
    """agentlace's tests/test_inference.py (edgeml.inference) and the original
    edgeml's (edgeml.interfaces). An unknown interface raises
    UnknownInterfaceError where they returned {"success": False, ...}."""
    import importlib
    mod = importlib.import_module(module)
    server = cleanup(mod.InferenceServer(0))  # agentlace: InferenceServer(port)
    server.register_interface("echo", echo)
    server.register_interface("greet", greet)
    server.start(threaded=True)
    client = cleanup(mod.InferenceClient("localhost", server.port))

    available_interfaces = client.interfaces()
    assert "echo" in available_interfaces and "greet" in available_interfaces
    response = client.call("echo", {"message": "test"})
    assert response["status"] == "ok" and response["message"]["message"] == "test"
    response = client.call("greet", {"name": "John"})
    assert response["status"] == "ok" and response["message"] == "Hello, John!"
    response = client.call("greet", {})
    assert response["status"] == "error" and response["message"] == "Name not provided"
    with pytest.raises(edgeml.UnknownInterfaceError) as e:
        client.call("unknown", {})
    assert e.value.interfaces == ["echo", "greet"]
    server.stop()


def test_readme_inference(cleanup):
    """The README example of agentlace and the original edgeml."""
    def predict(payload):
        return {"prediction": "some_value"}

    inference_server = cleanup(edgeml.InferenceServer(port_num=0))
    inference_server.register_interface("voice_reg", predict)
    inference_server.register_interface("face_reg", predict)
    inference_server.start(threaded=True)
    client = cleanup(edgeml.InferenceClient("localhost", inference_server.port))
    assert client.call("voice_reg", {"audio": "serialized_audio"}) == {"prediction": "some_value"}


def test_keyword_spellings_and_timeout_ms(cleanup):
    """server_ip=, port_num=, timeout_ms= (applied: a call slower than it
    times out) and wait_for_server=."""
    release = threading.Event()
    server = cleanup(edgeml.InferenceServer(port_num=0, host="127.0.0.1"))
    server.register_interface("slow", lambda p: release.wait(scaled(30)) and {"ok": True})
    server.register_interface("echo", lambda p: p)
    server.start(threaded=True)
    try:
        c = cleanup(edgeml.InferenceClient(server_ip="127.0.0.1", port_num=server.port, timeout_ms=100,
                                           wait_for_server=True))
        assert c.timeout == pytest.approx(0.1)
        with pytest.raises(edgeml.EdgeMLTimeoutError):
            c.call("slow", {})
    finally:
        release.set()
    assert c.call("echo", {"x": 1}, timeout=scaled(10)) == {"x": 1}
    with pytest.raises(TypeError, match="port_num"):
        edgeml.InferenceClient("127.0.0.1", server.port, port_num=server.port + 1)
    with pytest.raises(ValueError, match="timeout_ms"):
        edgeml.InferenceClient("127.0.0.1", server.port, timeout_ms=-5)
