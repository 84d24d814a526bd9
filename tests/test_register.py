"""Register stage + served model, with real MLflow (sqlite store in a temp project).

One module-scoped project registers three checkpoints (metrics 0.3, 0.5, 0.4): the gate must
promote the first two and refuse the third. The champion is then loaded as a pyfunc and served
over HTTP, and its embeddings must equal SLQEncoder's on the same checkpoint.
"""

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import base64  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from slq.mlops.config import Config  # noqa: E402
from slq.mlops import tracking  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "slq-retriever"
GATE_METRICS = (0.3, 0.5, 0.4)  # -> promoted, promoted, refused
CHAMPION = 1  # index of the registration that should end up champion (version 2)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with a tiny backbone and three query checkpoints (different seeds)."""
    from slq.miniature.tiny import build_tiny_backbone
    from slq.encoder import SLQEncoder

    root = tmp_path_factory.mktemp("register")
    backbone = build_tiny_backbone("qwen2_vl", root / "models" / "tiny")
    cfg = Config(root=str(root))
    cfg.backbone.path = "models/tiny"
    ckpts = []
    for seed, metric in enumerate(GATE_METRICS):
        enc = SLQEncoder.from_pretrained(backbone, num_queries=4, seed=seed)
        ckpts.append(enc.save(root / f"ckpt{seed}", metrics={"t2i_R@1": metric}))
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text(json.dumps({"t2i_R@1": 0.5}))
    return cfg, ckpts


@pytest.fixture(scope="module")
def registered(project):
    """Register the three checkpoints in order; the reports of each run."""
    cfg, ckpts = project
    reports = []
    for i, (ckpt, metric) in enumerate(zip(ckpts, GATE_METRICS)):
        reports.append(tracking.register_model(
            cfg, metrics={"t2i_R@1": metric, "i2t_R@1": metric / 2, "checkpoint_hash": f"h{i}"},
            params={"pipeline": {"attempt": i}},
            artifacts={"reports": cfg.path("metrics/eval.json")},
            tags={"data_hash": "d41d8", "lancedb_version.slq_test_text": 3},
            checkpoint_dir=ckpt,
        ))
    return reports


@pytest.fixture(scope="module")
def champion_encoder(project):
    """SLQEncoder on the checkpoint that should be champion: the reference embeddings."""
    from slq.encoder import SLQEncoder

    _, ckpts = project
    return SLQEncoder.from_pretrained(queries=ckpts[CHAMPION])


@pytest.fixture(scope="module")
def champion_model(registered):
    import mlflow

    mlflow.set_tracking_uri(registered[0]["tracking_uri"])
    return mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")


def _images():
    out = []
    for color in ("red", "blue", "green"):
        im = Image.new("RGB", (56, 56), "gray")
        ImageDraw.Draw(im).ellipse([10, 10, 40, 40], fill=color)
        out.append(im)
    return out


def _b64_png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- the gate ------------------------------------------------------------------------------
def test_gate_promotes_only_improvements(project, registered):
    from mlflow import MlflowClient

    cfg, _ = project
    first, second, third = registered
    assert [r["version"] for r in registered] == [1, 2, 3]
    assert first["promoted"] and first["previous_champion_version"] is None
    assert second["promoted"] and second["previous_champion_version"] == 1
    assert second["previous_champion_metric"] == pytest.approx(0.3)
    assert not third["promoted"]
    assert third["previous_champion_version"] == 2 and third["champion_version"] == 2
    assert "0.4 <= 0.5" in third["reason"] and "version 2" in third["reason"]

    client = MlflowClient(third["tracking_uri"])
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 2
    on_disk = json.loads(cfg.path(cfg.register.out).read_text())
    assert on_disk["promoted"] is False and on_disk["reason"] == third["reason"]
    assert on_disk["run_id"] == third["run_id"]


def test_run_records_lineage(project, registered):
    cfg, _ = project
    info = tracking.show_run(cfg, registered[2]["run_id"])
    assert info["metrics"] == {"t2i_R_at_1": pytest.approx(0.4), "i2t_R_at_1": pytest.approx(0.2)}
    assert info["params"]["train.lr"] == str(cfg.train.lr) and info["params"]["pipeline.attempt"] == "2"
    tags = info["tags"]
    assert tags["git_commit"] == "unknown"  # the temp project is not a git repository
    assert tags["data_hash"] == "d41d8" and tags["lancedb_version.slq_test_text"] == "3"
    assert tags["metric.checkpoint_hash"] == "h2"
    assert tags["promotion.promoted"] == "False" and tags["promotion.previous_champion_version"] == "2"
    assert "reports" in info["artifacts"]
    assert info["model_versions"] == [{"name": MODEL, "version": 3, "aliases": []}]

    runs = tracking.list_runs(cfg, n=2)
    assert [r["run_id"] for r in runs] == [registered[2]["run_id"], registered[1]["run_id"]]
    assert runs[1]["promoted"] == "True" and runs[1]["t2i_R_at_1"] == pytest.approx(0.5)


# ---- the served model ----------------------------------------------------------------------
def test_champion_predicts_like_the_encoder(champion_model, champion_encoder, tmp_path):
    import pandas as pd

    texts = ["a red circle", "a blue square on the left", "green"]
    got = champion_model.predict(pd.DataFrame({"text": texts}))
    np.testing.assert_allclose(got, champion_encoder.encode_text(texts), atol=1e-5)

    images = _images()
    images[2].save(tmp_path / "green.png")
    cells = [_b64_png(images[0]), "data:image/png;base64," + _b64_png(images[1]), str(tmp_path / "green.png")]
    got = champion_model.predict(pd.DataFrame({"image": cells}))
    np.testing.assert_allclose(got, champion_encoder.encode_image(images), atol=1e-5)

    mixed = pd.DataFrame({"text": [None, "a red circle", "make it blue"],
                          "image": [cells[0], None, cells[0]]})
    got = champion_model.predict(mixed)
    assert got.shape == (3, champion_encoder.backbone.hidden_size)
    np.testing.assert_allclose(got[0], champion_encoder.encode_image(images[:1])[0], atol=1e-5)
    np.testing.assert_allclose(got[1], champion_encoder.encode_text(["a red circle"])[0], atol=1e-5)
    np.testing.assert_allclose(got[2], champion_encoder.encode_multimodal([(images[0], "make it blue")])[0],
                               atol=1e-5)


def test_bad_rows_are_named(champion_model):
    import pandas as pd

    with pytest.raises(Exception, match=r"row 1: has neither `text` nor `image`"):
        champion_model.predict(pd.DataFrame({"text": ["ok", None], "image": [None, None]}))
    with pytest.raises(Exception, match=r"row 0: `image` is neither an existing file path nor base64"):
        champion_model.predict(pd.DataFrame({"image": ["/no/such/file.png"]}))
    not_an_image = base64.b64encode(b"definitely not a png").decode()
    with pytest.raises(Exception, match=r"row 1: `image` cannot be decoded"):
        champion_model.predict(pd.DataFrame({"image": [_b64_png(_images()[0]), not_an_image]}))


def test_backbone_by_path_only(project, champion_encoder):
    """log_backbone=False logs only the checkpoint; the model finds the backbone by its path."""
    import mlflow
    import pandas as pd

    cfg, ckpts = project
    cfg = dataclasses.replace(cfg, register=dataclasses.replace(
        cfg.register, model_name="slq-path-only", log_backbone=False, out="reports/register_path_only.json"))
    report = tracking.register_model(cfg, metrics={"t2i_R@1": 0.1}, checkpoint_dir=ckpts[CHAMPION])
    assert report["promoted"] and report["version"] == 1
    info = mlflow.models.get_model_info(report["model_uri"])
    assert set(info.flavors["python_function"]["artifacts"]) == {"checkpoint"}
    model = mlflow.pyfunc.load_model("models:/slq-path-only@champion")
    got = model.predict(pd.DataFrame({"text": ["a red circle"]}))
    np.testing.assert_allclose(got, champion_encoder.encode_text(["a red circle"]), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_http(registered, champion_encoder, tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered[0]["tracking_uri"]}
    env.pop("PYTHONPATH", None)  # the model must bring its own `slq` code
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"server exited:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "server not up in 120 s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["a red circle"]]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: our own process group
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert preds.shape == (1, champion_encoder.backbone.hidden_size)
    np.testing.assert_allclose(preds, champion_encoder.encode_text(["a red circle"]), atol=1e-5)


# ---- manual promotion (last: it moves the alias and puts it back) --------------------------
def test_an_identical_checkpoint_adds_no_version(project, registered):
    """Registering the same checkpoint again (e.g. `dvc repro --force`, a nightly flow) logs a new run
    but reuses its model version instead of adding an identical one."""
    from mlflow import MlflowClient

    cfg, ckpts = project
    cfg = dataclasses.replace(cfg, register=dataclasses.replace(cfg.register, out="reports/register_again.json"))
    client = MlflowClient(registered[0]["tracking_uri"])
    before = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    again = tracking.register_model(cfg, metrics={"t2i_R@1": GATE_METRICS[0]}, checkpoint_dir=ckpts[0])
    after = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    assert after == before and again["version"] == registered[0]["version"]
    assert again["run_id"] not in {r["run_id"] for r in registered}
    assert client.get_run(again["run_id"]).data.tags["reused_model_version"] == str(again["version"])


def test_manual_promotion(project, registered):
    cfg, _ = project
    refused = tracking.promote(cfg, 3)
    assert not refused["promoted"] and refused["champion_version"] == 2
    forced = tracking.promote(cfg, 3, force=True)
    assert forced["promoted"] and forced["previous_champion_version"] == 2
    back = tracking.promote(cfg, 2)  # 0.5 > 0.4: passes the gate
    assert back["promoted"] and back["previous_champion_version"] == 3
    assert tracking.promote(cfg, 2)["reason"].endswith("already holds @champion")


def test_the_gate_never_compares_numbers_of_another_evaluation(project, registered):
    """A version scored on other data, split, ks or benchmarks (another evaluation_key) is kept out,
    however high its number: the champion's number was measured on something else."""
    from slq.encoder import SLQEncoder

    cfg, ckpts = project
    cfg = dataclasses.replace(cfg, register=dataclasses.replace(cfg.register, out="reports/register_other.json"))
    enc = SLQEncoder.from_pretrained(queries=ckpts[0])
    enc.queries.weight.data.mul_(2)  # another checkpoint (another hash) on the same backbone
    ckpt = enc.save(cfg.path("ckpt_other"))
    other = tracking.register_model(cfg, metrics={"t2i_R@1": 0.99}, checkpoint_dir=ckpt,
                                    tags={"evaluation_key": "a-different-key"})
    assert not other["promoted"] and "another evaluation" in other["reason"]
    assert "a-different-key" in other["reason"] and other["champion_version"] == other["previous_champion_version"]
    by_hand = tracking.promote(cfg, other["version"])  # the gate by hand refuses it too
    assert not by_hand["promoted"] and "another evaluation" in by_hand["reason"]
