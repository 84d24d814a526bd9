import os

for k, v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(k, v)

import pytest  # noqa: E402

from slq.miniature.tiny import TINY_TYPES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny random model of every supported class, saved like a real checkpoint."""
    from slq.miniature.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("backbones")
    return {t: build_tiny_backbone(t, root / t) for t in TINY_TYPES}


@pytest.fixture(scope="session")
def color_pairs():
    """(image, caption) pairs that a query bank can learn to match."""
    from PIL import Image, ImageDraw

    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
    boxes = {"left": (4, 20), "right": (36, 20), "top": (20, 4), "bottom": (20, 36)}
    pairs = []
    for pos, (x, y) in boxes.items():
        for c in colors:
            for shape in ("circle", "square"):
                im = Image.new("RGB", (56, 56), "gray")
                d = ImageDraw.Draw(im)
                (d.ellipse if shape == "circle" else d.rectangle)([x, y, x + 16, y + 16], fill=c)
                pairs.append((im, f"a {c} {shape} on the {pos}"))
    return pairs


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def real_layout_dirs(tmp_path_factory):
    """One folder per family laid out like its real Hugging Face download (tests/real_layout.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_layout import FAMILIES, build_real_layout

    root = tmp_path_factory.mktemp("real_layout_dirs")
    return {f: build_real_layout(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port) for the session; stopped at the end."""
    import socket

    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
