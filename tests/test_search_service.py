"""The search service (slq.mlops.service) as a client meets it, the CLI's search and serve --search, and
the served pyfunc's input checks.

One module-scoped project: a tiny Qwen2-VL backbone, an untrained query checkpoint, twelve drawn
scenes under data/, embedded with that checkpoint and indexed by the real index stage into LanceDB
(exact: the default ann_min_rows), plus a second index of the same vectors with ann_min_rows low
enough that both tables get a tuned IVF_PQ index. The app is the real FastAPI app under
TestClient; nothing is mocked.
"""

import base64
import io
import json
import os
import time

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

pytestmark = pytest.mark.integration
pytest.importorskip("fastapi")
pytest.importorskip("lancedb")

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]
MAX_TEXT, MAX_K, MAX_IMAGE = 200, 20, 200_000


def scene(color: str, shape: str) -> Image.Image:
    im = Image.new("RGB", (56, 56), "gray")
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)([14, 14, 42, 42], fill=color)
    return im


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tiny_project(root, max_text: int, max_k: int, max_image: int, model: str | None = None):
    """A project folder for the service tests: a tiny Qwen2-VL backbone (your own), params.yaml with
    the request limits (and register.model_name), an untrained 4-query checkpoint at train.out.
    Returns (cfg, encoder, backbone folder, checkpoint folder)."""
    from slq.encoder import SLQEncoder
    from slq.miniature.tiny import build_tiny_backbone
    from slq.mlops.config import load_config

    backbone = build_tiny_backbone("qwen2_vl", root / "models" / "tiny")
    params = {"backbone": {"path": "models/tiny", "builtin": False, "dtype": "float32", "device": "cpu"},
              "data": {"root": "data"},
              "index": {"max_text_chars": max_text, "max_k": max_k, "max_image_bytes": max_image}}
    if model is not None:
        params["register"] = {"model_name": model}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root / "params.yaml")
    enc = SLQEncoder.from_pretrained(backbone, num_queries=4, seed=0)
    ckpt = enc.save(cfg.path(cfg.train.out), metrics={})
    return cfg, enc, backbone, ckpt


def embed_split(enc, root, cfg, ckpt_hash: str) -> None:
    """The embed stage's files for the test split, made with `enc` (as the embed stage would)."""
    from slq.io import write_json_atomic

    rows = [(c, s) for c in COLORS for s in SHAPES]  # 12 scenes
    paths = [f"images/test/{i:02d}.png" for i in range(len(rows))]
    data = root / "data"
    for (c, s), p in zip(rows, paths):
        (data / p).parent.mkdir(parents=True, exist_ok=True)
        scene(c, s).save(data / p)
    captions = [(i, f"a {c} {s}") for i, (c, s) in enumerate(rows)] + \
               [(i, f"a gray picture with a {c} {s} in the middle") for i, (c, s) in enumerate(rows)]
    img = enc.encode_image([data / p for p in paths], progress=False)
    txt = enc.encode_text([t for _, t in captions], progress=False)
    out = cfg.path(cfg.embed.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "test_image.npy", img)
    np.save(out / "test_text.npy", txt)
    (out / "test_image.jsonl").write_text("".join(
        json.dumps({"image_id": f"s{i:02d}", "image": p, "split": "test"}) + "\n" for i, p in enumerate(paths)))
    (out / "test_text.jsonl").write_text("".join(
        json.dumps({"id": f"c{j:02d}", "image_id": f"s{i:02d}", "caption": t, "split": "test"}) + "\n"
        for j, (i, t) in enumerate(captions)))
    write_json_atomic(out / "meta.json", {"checkpoint_hash": ckpt_hash, "dim": int(img.shape[1])})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from slq.checkpoint import checkpoint_hash
    from slq.encoder import SLQEncoder
    from slq.mlops.config import load_config
    from slq.mlops.stages import index

    root = tmp_path_factory.mktemp("searchproj")
    cfg, enc, backbone, ckpt = tiny_project(root, MAX_TEXT, MAX_K, MAX_IMAGE)
    embed_split(enc, root, cfg, checkpoint_hash(ckpt))
    index.run(cfg)
    ann = load_config(root / "params.yaml", {"index.uri": "artifacts/lancedb_ann", "index.out": "artifacts/ann.json",
                                            "index.metrics": "metrics/ann.json", "index.ann_min_rows": 12})
    index.run(ann)
    other = SLQEncoder.from_pretrained(backbone, num_queries=4, seed=1).save(root / "other_ckpt", metrics={})
    return {"root": root, "cfg": cfg, "ann": ann, "enc": enc, "other": other}


@pytest.fixture(scope="module")
def client(project):
    from fastapi.testclient import TestClient

    from slq.mlops.service import create_app

    app = create_app(project["cfg"], encoder=project["enc"])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def vectors(project, modality):
    out = project["cfg"].path(project["cfg"].embed.out)
    return np.load(out / f"test_{modality}.npy")


def ranked_ids(gallery: np.ndarray, q: np.ndarray, prefix: str, k: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in np.argsort(-(gallery @ q), kind="stable")[:k]]


# ---- answers ---------------------------------------------------------------------------------
def test_text_query_returns_the_exact_top_k(client, project):
    r = client.post("/search", json={"text": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["query"], body["target"], body["split"], body["k"]) == ("text", "image", "test", 5)
    assert body["table"] == "slq_test_image" and body["search"]["mode"] == "exact"
    q = project["enc"].encode_text(["a red circle"], progress=False)[0]
    assert [h["id"] for h in body["hits"]] == ranked_ids(vectors(project, "image"), q, "s", 5)
    scores = [h["score"] for h in body["hits"]]
    np.testing.assert_allclose(scores, np.sort(vectors(project, "image") @ q)[::-1][:5], atol=1e-5)
    assert body["hits"][0]["image"].startswith("images/test/")


def test_image_queries_by_base64_and_by_path(client, project):
    img = vectors(project, "image")
    cases = [{"image_b64": png_b64(scene("blue", "square"))},
             {"image_b64": "data:image/png;base64," + png_b64(scene("blue", "square"))},
             {"image_url": "images/test/05.png"},
             {"image_url": (project["root"] / "data/images/test/05.png").as_uri()},
             {"image_url": str(project["root"] / "data/images/test/05.png")}]
    for case in cases:
        r = client.post("/search", json={**case, "target": "image", "k": 3})
        assert r.status_code == 200, (case.keys(), r.text)
        hits = r.json()["hits"]
        assert hits[0]["id"] == "s05" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["id"] for h in hits] == ranked_ids(img, img[5], "s", 3)
    r = client.post("/search", json={"image_url": "images/test/05.png"})  # default target: the captions
    assert r.status_code == 200 and r.json()["target"] == "text" and r.json()["query"] == "image"
    assert len(r.json()["hits"]) == 10 and r.json()["hits"][0]["caption"]


def test_image_plus_instruction(client, project):
    r = client.post("/search", json={"image_url": "images/test/00.png", "instruction": "make it blue", "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "image+instruction" and body["target"] == "image"
    q = project["enc"].encode_multimodal([(scene("red", "circle"), "make it blue")], progress=False)[0]
    assert [h["id"] for h in body["hits"]] == ranked_ids(vectors(project, "image"), q, "s", 4)


def test_health(client, project):
    from slq.checkpoint import checkpoint_hash

    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["checkpoint_hash"] == checkpoint_hash(project["cfg"].path(project["cfg"].train.out))


def test_the_ann_index_is_used_with_its_tuned_settings(project):
    from fastapi.testclient import TestClient

    from slq.mlops.service import create_app

    tuned = json.loads(project["ann"].path(project["ann"].index.out).read_text())["slq_test_image"]["search"]
    with TestClient(create_app(project["ann"], encoder=project["enc"]), raise_server_exceptions=False) as c:
        r = c.post("/search", json={"text": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    s = r.json()["search"]
    assert s["mode"] == "ann" and (s["nprobes"], s["refine_factor"]) == (tuned["nprobes"], tuned["refine_factor"])
    assert s["recall"] >= 0.95
    q = project["enc"].encode_text(["a red circle"], progress=False)[0]
    assert [h["id"] for h in r.json()["hits"]] == ranked_ids(vectors(project, "image"), q, "s", 5)


# ---- refusals --------------------------------------------------------------------------------
def error_of(r, status: int, *words) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    for w in words:
        assert w in body["error"], (w, body["error"])
    return body["error"]


BAD = [
    ({"txt": "a red circle"}, 422, ["unknown field 'txt'", "text, image_b64, image_url"]),
    ({"text": "a red circle", "imgae_url": "images/test/00.png"}, 422, ["unknown field 'imgae_url'"]),
    ({"text": ""}, 422, ["text is empty"]),
    ({"text": "   "}, 422, ["text is empty"]),
    ({"text": "x" * (MAX_TEXT + 1)}, 422, [f"{MAX_TEXT + 1:,} characters", "index.max_text_chars"]),
    ({"text": "a", "k": 0}, 422, ["k must be between 1 and 20", "got 0"]),
    ({"text": "a", "k": MAX_K + 1}, 422, ["k must be between 1 and 20"]),
    ({"text": "a", "k": "many"}, 422, ["field 'k'", "integer"]),
    ({"text": 5}, 422, ["field 'text'", "string"]),
    ({"text": "a", "target": "audio"}, 422, ["target 'audio'", "image, text"]),
    ({"text": "a", "split": "nope"}, 404, ["no index for split 'nope'", "splits with an image index: test"]),
    ({}, 422, ["no query"]),
    ({"instruction": "make it blue"}, 422, ["instruction needs an image"]),
    ({"text": "a", "image_url": "images/test/00.png"}, 422, ["give text, or an image"]),
    ({"image_b64": "aGVsbG8=", "image_url": "images/test/00.png"}, 422, ["not both"]),
    ({"image_b64": base64.b64encode(b"definitely not a png").decode()}, 422, ["image_b64 cannot be decoded"]),
    ({"image_b64": "%%% not base64 %%%"}, 422, ["image_b64 is not valid base64"]),
    ({"image_b64": "A" * (MAX_IMAGE * 4 // 3 + 100)}, 413, ["image_b64 is over the limit", "index.max_image_bytes"]),
    ({"image_b64": "A" * (MAX_IMAGE * 2)}, 413, ["the request body", "over the limit"]),
    ({"image_url": "../params.yaml"}, 403, ["'..' is not allowed"]),
    ({"image_url": "images/../../params.yaml"}, 403, ["'..' is not allowed"]),
    ({"image_url": "/etc/passwd"}, 403, ["outside the image root"]),
    ({"image_url": "file:///etc/passwd"}, 403, ["outside the image root"]),
    ({"image_url": "http://example.com/cat.png"}, 422, ["http: URLs are not fetched", "image_b64"]),
    ({"image_url": "images/test/99.png"}, 404, ["no such file under the image root"]),
    ({"image_url": "images/test/05.png", "instruction": ""}, 422, ["instruction is empty"]),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_a_one_line_4xx(client, body, status, words):
    error_of(client.post("/search", json=body), status, *words)


def test_bad_bodies_and_files(client, project):
    error_of(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}),
             422, "not valid JSON")
    error_of(client.post("/search", json=["text", "a"]), 422, "must be a JSON object")
    bad = project["root"] / "data/images/test/broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    error_of(client.post("/search", json={"image_url": "images/test/broken.png"}), 422, "cannot be decoded")
    outside = project["root"] / "secret.png"
    scene("red", "circle").save(outside)
    link = project["root"] / "data/images/link.png"
    link.symlink_to(outside)  # a link inside the root to a file outside it
    error_of(client.post("/search", json={"image_url": "images/link.png"}), 403, "outside the image root")


def test_long_text_is_refused_before_tokenizing(client, monkeypatch):
    service = client.app.state.service
    calls = []
    monkeypatch.setattr(service.encoder, "encode_text", lambda *a, **kw: calls.append(a))
    t0 = time.perf_counter()
    r = client.post("/search", json={"text": "x" * 10_000_000})
    assert time.perf_counter() - t0 < 5
    error_of(r, 413, "request body", "over the limit")
    error_of(client.post("/search", json={"text": "x" * (MAX_TEXT + 1)}), 422, "characters")
    assert calls == []


def test_an_unexpected_failure_is_a_one_line_500(client, monkeypatch):
    service = client.app.state.service

    def boom(*a, **kw):
        raise RuntimeError("the model fell over\nwith a second line")

    monkeypatch.setattr(service.encoder, "encode_text", boom)
    msg = error_of(client.post("/search", json={"text": "a red circle"}), 500, "internal error (RuntimeError)")
    assert "fell over" not in msg


def test_a_table_of_another_checkpoint_stops_the_start(project):
    from slq.mlops.search import CheckpointMismatch
    from slq.mlops.service import create_app

    with pytest.raises(CheckpointMismatch, match=r"table slq_test_image was written by checkpoint [0-9a-f]{16}, "
                                                 r"not by the checkpoint .*other_ckpt"):
        create_app(project["cfg"], encoder=project["enc"], checkpoint_dir=project["other"])


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_search_and_serve_search(project, monkeypatch):
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    params = str(project["root"] / "params.yaml")
    res = runner.invoke(cli.app, ["search", "a red circle", "--k", "3", "--json", "-p", params])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["search"]["mode"] == "exact" and len(out["hits"]) == 3 and out["table"] == "slq_test_image"

    ann = ["-p", params, "--set", "index.uri=artifacts/lancedb_ann", "--set", "index.out=artifacts/ann.json"]
    res = runner.invoke(cli.app, ["search", "a red circle", "--json", *ann])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["search"]["mode"] == "ann"
    res = runner.invoke(cli.app, ["search", "a red circle", "--json", "--exact", *ann])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["search"] == {"mode": "exact", "why": "exact search was asked for"}

    res = runner.invoke(cli.app, ["search", "a red circle", "-p", params, "--set", f"train.out={project['other']}"])
    assert res.exit_code == 1 and res.stdout == ""
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "was written by checkpoint" in lines[0] and "dvc repro index" in lines[0], res.stderr

    res = runner.invoke(cli.app, ["serve", "--exact", "-p", params])
    assert res.exit_code == 1 and "--exact applies to --search only" in res.stderr

    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("the MLflow server must not start"))
    res = runner.invoke(cli.app, ["serve", "--search", "--port", "5999", "-p", params])
    assert res.exit_code == 0, res.output
    assert started["port"] == 5999 and started["host"] == "127.0.0.1"
    assert started["app"].state.service.searcher.exact is False

    res = runner.invoke(cli.app, ["serve", "--search", "-p", params, "--set", f"train.out={project['other']}"])
    assert res.exit_code == 1 and "was written by checkpoint" in res.stderr


# ---- the served pyfunc -----------------------------------------------------------------------
def test_pyfunc_refuses_unknown_columns_and_long_text(project):
    import pandas as pd

    from slq.inputs import InputError
    from slq.mlops.serve import SLQPyfunc, model_signature

    model = SLQPyfunc()
    model.encoder = project["enc"]
    with pytest.raises(InputError, match=r"unknown column\(s\) \['txt'\]: the model reads only `text` and `image`"):
        model.predict(None, pd.DataFrame({"txt": ["a red circle"]}))
    with pytest.raises(InputError, match=r"unknown column\(s\) \['imgae'\]"):
        model.predict(None, pd.DataFrame({"text": ["a red circle"], "imgae": ["x"]}))
    with pytest.raises(InputError, match="no `text` or `image` column"):
        model.predict(None, pd.DataFrame())
    model.max_text_chars = 50
    with pytest.raises(InputError, match="row 1: `text` has 51 characters, over the limit of 50"):
        model.predict(None, pd.DataFrame({"text": ["ok", "y" * 51]}))
    got = model.predict(None, pd.DataFrame({"text": ["a red circle"]}))
    np.testing.assert_allclose(got, project["enc"].encode_text(["a red circle"], progress=False), atol=1e-5)
    # no input schema: MLflow would drop an unnamed column before predict could refuse it
    assert model_signature(8).inputs is None


def test_served_pyfunc_answers_400_with_the_message(project, tmp_path):
    """Through MLflow's own scoring app (what `mlflow models serve` runs), in-process: a misspelt
    column is a 400 naming it (it was a 200 with an empty list), over-long text a 400 too."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc.scoring_server import init

    from slq.mlops.serve import log_model

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        cfg = project["cfg"]
        # its own experiment in this store: the process-wide active experiment may be another store's
        exp = mlflow.set_experiment("pyfunc-400")
        with mlflow.start_run(experiment_id=exp.experiment_id):
            info = log_model(cfg.path(cfg.train.out), cfg.path(cfg.backbone.path), 64, log_backbone=False,
                             max_text_chars=50)
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(before)
    with TestClient(init(model)) as c:
        def invoke(columns, rows):
            return c.post("/invocations", json={"dataframe_split": {"columns": columns, "data": rows}})

        r = invoke(["txt"], [["a red circle"]])
        assert r.status_code == 400 and "unknown column(s) ['txt']" in r.json()["message"], r.text
        assert "stack_trace" not in r.json()
        r = invoke(["text", "imgae"], [["a red circle", "x"]])
        assert r.status_code == 400 and "['imgae']" in r.json()["message"]
        r = invoke(["text"], [["z" * 51]])
        assert r.status_code == 400 and "over the limit of 50" in r.json()["message"]
        r = invoke(["text"], [["a red circle"]])
        assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], project["enc"].encode_text(["a red circle"], progress=False),
                               atol=1e-5)
