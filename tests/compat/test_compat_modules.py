"""The module paths agentlace and the original edgeml code imports, and
edgeml.internal.utils (JPEG helpers with OpenCV or Pillow, compute_hash)."""
import hashlib
import importlib
import io
import pickle
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(60)

NAMES = {
    "edgeml.action": ["ActionConfig", "ActionServer", "ActionClient", "ObsCallback", "ActCallback"],
    "edgeml.trainer": ["TrainerConfig", "TrainerServer", "TrainerClient", "TrainerSMInterface", "TrainerTunnel"],
    "edgeml.inference": ["InferenceServer", "InferenceClient"],
    "edgeml.data.data_store": ["DataStoreBase", "QueuedDataStore"],
    "edgeml.gym_env": ["GymEnvServerWrapper", "GymEnvClient"],
    "edgeml.internal.utils": ["mat_to_jpeg", "jpeg_to_mat", "compute_hash"],
    "edgeml.interfaces": ["EdgeConfig", "EdgeServer", "EdgeClient", "InferenceServer", "InferenceClient"],
    "edgeml.edge": ["EdgeConfig", "EdgeServer", "EdgeClient"],
}


@pytest.mark.parametrize("module", sorted(NAMES))
def test_module_paths(module):
    mod = importlib.import_module(module)
    for name in NAMES[module]:
        assert callable(getattr(mod, name)), f"{module}.{name}"


def test_same_classes_everywhere():
    import edgeml
    from edgeml import action, interfaces, trainer
    assert action.ActionServer is edgeml.EdgeServer is interfaces.EdgeServer
    assert trainer.TrainerSMInterface is edgeml.TrainerSMInterface
    assert interfaces.InferenceClient is edgeml.InferenceClient


def test_compute_hash_is_agentlaces():
    from edgeml.internal.utils import compute_hash
    cfg = '{"port_number":5555,"broadcast_port":5556}'
    assert compute_hash(cfg) == hashlib.md5(pickle.dumps(cfg)).hexdigest()
    assert compute_hash(cfg) == compute_hash(str(cfg)) != compute_hash(cfg + " ")


def _bgr_image():
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :, 0] = 200  # blue, in OpenCV's BGR order
    img[:16, :, 2] = 120  # red in the top half
    return img


def test_jpeg_round_trip_in_bgr_order():
    from edgeml.internal.utils import jpeg_to_mat, mat_to_jpeg
    img = _bgr_image()
    buf = mat_to_jpeg(img)
    assert isinstance(buf, bytes) and buf[:2] == b"\xff\xd8"  # a JPEG (SOI marker)
    back = jpeg_to_mat(buf)
    assert back.shape == img.shape and back.dtype == np.uint8
    diff = np.abs(back.astype(int) - img.astype(int))
    assert diff.mean() < 4 and np.median(diff) <= 2  # lossy (chroma is subsampled at the edge), but close
    assert jpeg_to_mat(bytearray(buf)).shape == img.shape and jpeg_to_mat(np.frombuffer(buf, np.uint8)).shape
    gray = jpeg_to_mat(mat_to_jpeg(img[:, :, 0]))
    assert gray.shape == (32, 48, 3)  # as OpenCV's IMREAD_COLOR gives a gray JPEG


def test_jpeg_channel_order_is_opencvs():
    """The bytes hold a real RGB JPEG: another decoder sees blue as blue."""
    Image = pytest.importorskip("PIL.Image")
    from edgeml.internal.utils import mat_to_jpeg
    rgb = np.asarray(Image.open(io.BytesIO(mat_to_jpeg(_bgr_image()))).convert("RGB"))
    assert rgb[20, 10, 2] > 180 and rgb[20, 10, 0] < 20  # bottom half: blue only
    assert rgb[5, 10, 0] > 100  # top half: red too


def test_jpeg_bad_input():
    from edgeml.internal.utils import jpeg_to_mat, mat_to_jpeg
    with pytest.raises(ValueError, match="not a JPEG"):
        jpeg_to_mat(b"definitely not a jpeg")  # OpenCV alone returned None
    with pytest.raises(ValueError, match="not a JPEG"):
        jpeg_to_mat(b"")
    with pytest.raises(TypeError, match="uint8"):
        mat_to_jpeg(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        mat_to_jpeg(np.zeros((4, 4, 5), np.uint8))


def test_jpeg_without_an_image_library(monkeypatch):
    from edgeml.internal import utils
    for name in ("cv2", "PIL", "PIL.Image"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now fails
    for fn, arg in ((utils.mat_to_jpeg, np.zeros((4, 4, 3), np.uint8)), (utils.jpeg_to_mat, b"\xff\xd8")):
        with pytest.raises(ImportError, match="opencv-python-headless") as e:
            fn(arg)
        assert "Pillow" in str(e.value) and fn.__name__ in str(e.value)


def test_no_pickle_helper():
    """make_compression_method (pickle over the wire) is deliberately absent."""
    from edgeml.internal import utils
    assert not hasattr(utils, "make_compression_method")
