"""`slq corpus embed` on the real tools: Ray Data on a local Ray instance, Lance/LanceDB tables and
the manifest (and its images) on S3 served by moto, the encoder on a tiny backbone.

- a Ray run killed (SIGKILL, right after its first commit) and rerun: every id once, nothing
  committed embedded again;
- the Ray path's vectors equal `SLQEncoder`'s in one process (other batches, other order);
- the in-process engine writes the same vectors; a rerun of a finished corpus does nothing;
- a table of another checkpoint is refused; bad rows and bad images are named by id;
- query banks (`--bank`): every bank's table from one pass over the corpus, each vector equal to
  that bank's own encoder; a Ray run killed between the banks' commits resumes each table where it
  stopped; a bank added later is embedded with that bank alone.

Ray starts once for the module; the killed run is a second driver joining it with --address.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUCKET = "corpus"
ATOL = 1e-5
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; credentials and endpoint in the environment,
    as a user would set them (none in params)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": url,
           "AWS_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"url": url, "client": client, "env": env}
    server.stop()


@pytest.fixture(scope="module")
def ray_address(s3):
    """One local Ray instance for the module (after `s3`, so its workers see the same environment)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # loopback only
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _draw(i: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (56, 56), "gray")
    x, y = 4 + 5 * (i % 6), 4 + 7 * (i // 6)
    d = ImageDraw.Draw(im)
    (d.ellipse if i % 2 else d.rectangle)([x, y, x + 18, y + 18], fill=COLORS[i % len(COLORS)])
    return im


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3):
    """A tiny backbone and checkpoint, 30 items (12 images, 12 captions, 6 image+instruction), the
    manifest on disk and on S3 (images relative to it), and each item's vector from SLQEncoder in
    one process, the reference every engine must match."""
    from slq.miniature.tiny import build_tiny_backbone
    from slq.checkpoint import checkpoint_hash
    from slq.encoder import SLQEncoder

    root = tmp_path_factory.mktemp("corpus")
    backbone = build_tiny_backbone("qwen2_vl", root / "backbone")
    enc = SLQEncoder.from_pretrained(backbone, num_queries=4, seed=0)
    ckpt = enc.save(root / "ckpt")
    (root / "images").mkdir()
    rows = []
    for i in range(12):
        _draw(i).save(root / "images" / f"{i}.png")
        rows.append({"id": f"img-{i}", "image": f"images/{i}.png"})
        rows.append({"id": f"txt-{i}", "text": f"a {COLORS[i % 6]} {'circle' if i % 2 else 'square'}" + " here" * i})
        if i % 2 == 0:
            rows.append({"id": f"mm-{i}", "image": f"images/{i}.png", "text": "make it blue"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for f in sorted((root / "images").iterdir()):
        s3["client"].upload_file(str(f), BUCKET, f"data/images/{f.name}")
    s3["client"].upload_file(str(manifest), BUCKET, "data/manifest.jsonl")
    params = root / "params.yaml"
    params.write_text("backbone: {dtype: float32, device: cpu}\n")

    bank_b = SLQEncoder.from_pretrained(backbone, num_queries=6, seed=1).save(root / "ckpt_b")  # same backbone
    ref = SLQEncoder.from_pretrained(queries=ckpt)  # the checkpoint as every consumer loads it
    return {"root": root, "ckpt": ckpt, "rows": rows, "manifest": manifest, "params": params,
            "s3_manifest": f"s3://{BUCKET}/data/manifest.jsonl", "expected": _expected(ref, rows, root),
            "hash": checkpoint_hash(ckpt), "fingerprint": ref.backbone.fingerprint, "ckpt_b": bank_b,
            "expected_b": _expected(SLQEncoder.from_pretrained(queries=bank_b), rows, root),
            "hash_b": checkpoint_hash(bank_b)}


def _expected(ref, rows, root) -> dict:
    """Each item's vector from a single-bank encoder in one process."""
    texts = [r for r in rows if "text" in r and "image" not in r]
    images = [r for r in rows if "image" in r and "text" not in r]
    pairs = [r for r in rows if "image" in r and "text" in r]
    expected = {}
    for group, vecs in ((texts, ref.encode_text([r["text"] for r in texts], progress=False)),
                        (images, ref.encode_image([root / r["image"] for r in images], progress=False)),
                        (pairs, ref.encode_multimodal([(root / r["image"], r["text"]) for r in pairs], progress=False))):
        expected.update({r["id"]: v for r, v in zip(group, vecs)})
    return expected


def _options():
    from slq.mlops.corpus.storage import storage_options

    return storage_options()  # from the environment alone


def _table(db_uri: str, name: str, storage_options=None, version=None):
    import lance

    return lance.dataset(f"{db_uri}/{name}.lance", storage_options=storage_options or None, version=version)


def _vectors(tbl) -> dict:
    t = tbl.to_table()
    return dict(zip(t.column("id").to_pylist(), np.stack(t.column("vector").to_numpy(zero_copy_only=False))))


@pytest.fixture(scope="module")
def killed_then_resumed(world, s3, ray_address):
    """The Ray engine on S3 in a second driver, SIGKILLed by the real code right after its first
    commit; then the same embed in this process: the versions and summaries of both."""
    from slq.mlops.corpus.embed import KILL_AFTER_COMMITS_ENV, EmbedJob, embed_corpus

    db = f"s3://{BUCKET}/lancedb"
    env = {**os.environ, **s3["env"], KILL_AFTER_COMMITS_ENV: "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cli", "corpus", "embed", world["s3_manifest"], "--checkpoint", str(world["ckpt"]),
           "--uri", db, "--table", "killed", "--address", ray_address, "--actors", "1", "--batch-size", "4",
           "--commit-rows", "8", "--no-progress", "-p", str(world["params"])]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    after_kill = _table(db, "killed", _options())
    killed_ids = after_kill.to_table(columns=["id"]).column("id").to_pylist()

    job = EmbedJob(manifest=world["s3_manifest"], checkpoint=str(world["ckpt"]), db_uri=db, table="killed",
                   actors=2, batch_size=4, commit_rows=8, storage_options=_options(), progress=False)
    summary = embed_corpus(job)  # joins this module's Ray instance
    return {"db": db, "killed_ids": killed_ids, "killed_version": after_kill.version, "summary": summary}


def test_ray_run_killed_after_a_commit_resumes_without_rewriting(world, killed_then_resumed):
    r = killed_then_resumed
    n = len(world["rows"])
    k = len(r["killed_ids"])
    assert 0 < k <= 8 and len(set(r["killed_ids"])) == k  # one chunk (commit_rows 8) committed, then the kill
    s = r["summary"]
    assert s["manifest_items"] == n and s["already_committed"] == k
    assert s["embedded"] == n - k and s["failed"] == 0 and s["rows"] == n  # nothing committed was embedded again
    final = _table(r["db"], "killed", _options())
    ids = final.to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(row["id"] for row in world["rows"])  # every id exactly once
    # the killed run's rows are untouched: the version it committed is a prefix of the final table
    before = _table(r["db"], "killed", _options(), version=r["killed_version"])
    assert sorted(before.to_table(columns=["id"]).column("id").to_pylist()) == sorted(r["killed_ids"])
    assert final.version == r["killed_version"] + s["commits"]


def test_ray_vectors_equal_single_process_encoder(world, killed_then_resumed):
    import lancedb

    tbl = _table(killed_then_resumed["db"], "killed", _options())
    got = _vectors(tbl)
    assert got.keys() == world["expected"].keys()
    for i, v in world["expected"].items():
        np.testing.assert_allclose(got[i], v, atol=ATOL, err_msg=i)
    rows = {r["id"]: r for r in tbl.to_table(columns=["id", "text", "image", "kind", "checkpoint_hash",
                                                      "backbone_fingerprint"]).to_pylist()}
    for r in world["rows"]:
        have = rows[r["id"]]
        assert have["text"] == r.get("text")
        assert have["image"] == (f"s3://{BUCKET}/data/{r['image']}" if "image" in r else None)
        assert have["kind"] == ("multimodal" if "text" in r and "image" in r else "text" if "text" in r else "image")
        assert (have["checkpoint_hash"], have["backbone_fingerprint"]) == (world["hash"], world["fingerprint"])
    # a LanceDB table on S3: an item's own vector finds it first
    db = lancedb.connect(killed_then_resumed["db"], storage_options=_options())
    hit = db.open_table("killed").search(world["expected"]["img-3"]).distance_type("dot").limit(1).to_list()[0]
    assert hit["id"] == "img-3"


def test_local_engine_same_vectors_and_finished_corpus_is_a_no_op(world, tmp_path):
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    db = str(tmp_path / "lancedb")
    job = EmbedJob(manifest=str(world["manifest"]), checkpoint=str(world["ckpt"]), db_uri=db, engine="local",
                   batch_size=5, commit_rows=12, progress=False)
    s = embed_corpus(job)
    assert (s["embedded"], s["commits"], s["rows"]) == (len(world["rows"]), 3, len(world["rows"]))
    got = _vectors(_table(db, "corpus"))
    for i, v in world["expected"].items():
        np.testing.assert_allclose(got[i], v, atol=ATOL, err_msg=i)
    again = embed_corpus(job)
    assert (again["embedded"], again["already_committed"], again["version"]) == (0, len(world["rows"]), s["version"])


def test_table_of_another_checkpoint_is_refused(world, tmp_path):
    import torch

    from slq.mlops.corpus import CorpusError
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus
    from slq.encoder import SLQEncoder

    other = SLQEncoder.from_pretrained(queries=world["ckpt"])
    with torch.no_grad():
        other.queries.weight.mul_(-1)
    other_ckpt = other.save(tmp_path / "other")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "text": "a red square"}) + "\n")
    db = str(tmp_path / "db")
    embed_corpus(EmbedJob(str(manifest), str(world["ckpt"]), db, engine="local", progress=False))
    with pytest.raises(CorpusError, match=rf"holds vectors of checkpoint {world['hash']}.*another table"):
        embed_corpus(EmbedJob(str(manifest), str(other_ckpt), db, engine="local", progress=False))


def test_bad_rows_and_images_are_named(world, tmp_path):
    from slq.mlops.corpus import CorpusError
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    def job(rows, **kw):
        m = tmp_path / "m.jsonl"
        m.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return EmbedJob(str(m), str(world["ckpt"]), str(tmp_path / "db"), engine="local", progress=False, **kw)

    good = {"id": "ok", "image": str(world["root"] / "images" / "0.png")}
    with pytest.raises(CorpusError, match=r"line 2: item 'x' has neither `text` nor `image`"):
        embed_corpus(job([good, {"id": "x", "text": "  "}]))
    with pytest.raises(CorpusError, match=r"id 'ok' appears in lines 1 and 2"):
        embed_corpus(job([good, good]))
    with pytest.raises(CorpusError, match=r"line 1: no `id`"):
        embed_corpus(job([{"text": "a caption"}]))
    with pytest.raises(CorpusError, match=r"checkpoint folder not found: .*nope"):
        embed_corpus(EmbedJob(str(world["manifest"]), str(tmp_path / "nope"), str(tmp_path / "db"), engine="local"))

    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [good, {"id": "broken", "image": "broken.png"}, {"id": "gone", "image": "gone.png", "text": "x"},
            {"id": "cap", "text": "a caption"}]
    with pytest.raises(CorpusError) as e:
        embed_corpus(job(rows))
    msg = str(e.value)
    assert "2 item(s) could not be embedded" in msg
    assert "item 'broken'" in msg and "cannot be decoded" in msg and "item 'gone'" in msg and "not found" in msg
    assert e.value.summary["embedded"] == 2  # the good ones are committed
    again = embed_corpus(job([good, {"id": "cap", "text": "a caption"}]))  # fixed: nothing left to embed
    assert (again["embedded"], again["rows"]) == (0, 2)


def test_cli_error_is_one_line(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    res = CliRunner().invoke(cli.app, ["corpus", "embed", str(world["manifest"]), "--checkpoint",
                                       str(tmp_path / "missing"), "--uri", str(tmp_path / "db"), "--no-ray",
                                       "-p", str(world["params"])])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip().startswith("error: checkpoint folder not found") and "missing" in res.stderr


def test_storage_options_come_from_params_and_environment():
    from slq.mlops.corpus.storage import storage_options

    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ENDPOINT_URL": "http://minio:9000"}
    assert storage_options(env=env) == {"aws_region": "us-east-1", "aws_endpoint": "http://minio:9000",
                                        "allow_http": "true", "aws_access_key_id": "id",
                                        "aws_secret_access_key": "secret"}
    assert storage_options("https://s3.example", "eu-west-1", env={}) == {"aws_region": "eu-west-1",
                                                                          "aws_endpoint": "https://s3.example"}


# ---- query banks: one pass over the corpus, a table per bank --------------------------------------

@pytest.fixture(scope="module")
def banks_killed_then_resumed(world, s3, ray_address):
    """`--bank a=... --bank b=...` on Ray and S3 in a second driver, SIGKILLed right after its first
    commit (bank a's first chunk; bank b's table still empty); then the same run in this process."""
    from slq.mlops.corpus.embed import KILL_AFTER_COMMITS_ENV, EmbedJob, embed_corpus

    db = f"s3://{BUCKET}/banks_db"
    banks = {"a": str(world["ckpt"]), "b": str(world["ckpt_b"])}
    env = {**os.environ, **s3["env"], KILL_AFTER_COMMITS_ENV: "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cli", "corpus", "embed", world["s3_manifest"], "--uri", db, "--table", "items",
           "--address", ray_address, "--actors", "1", "--batch-size", "4", "--commit-rows", "8", "--no-progress",
           "-p", str(world["params"])]
    for name, ckpt in banks.items():
        cmd += ["--bank", f"{name}={ckpt}"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    after_kill = {b: _table(db, f"items_{b}", _options()).to_table(columns=["id"]).column("id").to_pylist()
                  for b in banks}
    job = EmbedJob(manifest=world["s3_manifest"], checkpoint=None, banks=banks, db_uri=db, table="items", actors=2,
                   batch_size=4, commit_rows=8, storage_options=_options(), progress=False)
    return {"db": db, "after_kill": after_kill, "summary": embed_corpus(job)}


def test_banks_ray_run_killed_between_banks_resumes_each_table(world, banks_killed_then_resumed):
    r = banks_killed_then_resumed
    n = len(world["rows"])
    k = len(r["after_kill"]["a"])
    assert 0 < k <= 8 and r["after_kill"]["b"] == []  # killed after bank a's first commit, before bank b's
    s = r["summary"]
    assert s["manifest_items"] == n and s["already_committed"] == 0 and s["failed"] == 0
    assert s["embedded"] == n  # every item was missing from some table
    a, b = s["banks"]["a"], s["banks"]["b"]
    assert (a["already_committed"], a["embedded"], a["rows"]) == (k, n - k, n)  # a's committed rows not redone
    assert (b["already_committed"], b["embedded"], b["rows"]) == (0, n, n)
    assert (a["checkpoint_hash"], b["checkpoint_hash"]) == (world["hash"], world["hash_b"])
    all_ids = sorted(row["id"] for row in world["rows"])
    for bank, expected, h in (("a", world["expected"], world["hash"]), ("b", world["expected_b"], world["hash_b"])):
        tbl = _table(r["db"], f"items_{bank}", _options())
        assert sorted(tbl.to_table(columns=["id"]).column("id").to_pylist()) == all_ids  # each id once per table
        got = _vectors(tbl)
        for i, v in expected.items():  # each bank's vector is that bank's own single-bank encode
            np.testing.assert_allclose(got[i], v, atol=ATOL, err_msg=f"bank {bank}, {i}")
        assert set(tbl.to_table(columns=["checkpoint_hash"]).column("checkpoint_hash").to_pylist()) == {h}
    assert not np.allclose(world["expected"]["img-3"], world["expected_b"]["img-3"])  # two banks, two spaces


def test_banks_local_engine_one_pass_per_item_and_a_bank_added_later(world, tmp_path, monkeypatch):
    """The in-process engine with two banks: the backbone sees each item once, every forward carries
    both banks' queries; a third bank added to the run later is computed alone, for its table only."""
    import slq.banks
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    calls = []
    real = slq.banks.forward_banks_split

    def spy(adapter, inputs, queries, **kw):
        calls.append((int(inputs["input_ids"].shape[0]), len(queries)))
        return real(adapter, inputs, queries, **kw)

    monkeypatch.setattr(slq.banks, "forward_banks_split", spy)
    db = str(tmp_path / "db")
    banks = {"a": str(world["ckpt"]), "b": str(world["ckpt_b"])}

    def job(banks):
        return EmbedJob(str(world["manifest"]), None, db, engine="local", banks=banks, batch_size=5, commit_rows=12,
                        progress=False)

    n = len(world["rows"])
    s = embed_corpus(job(banks))
    assert sum(b for b, _ in calls) == n and {q for _, q in calls} == {2}  # one pass per item, both banks in it
    assert (s["embedded"], s["banks"]["a"]["rows"], s["banks"]["b"]["rows"]) == (n, n, n)
    assert s["commits"] == 2 * 3  # 3 chunks of at most 12, one commit per bank and chunk
    for bank, expected in (("a", world["expected"]), ("b", world["expected_b"])):
        got = _vectors(_table(db, f"corpus_{bank}"))
        for i, v in expected.items():
            np.testing.assert_allclose(got[i], v, atol=ATOL, err_msg=f"bank {bank}, {i}")

    calls.clear()
    versions = {b: _table(db, f"corpus_{b}").version for b in banks}
    s2 = embed_corpus(job({**banks, "c": str(world["ckpt_b"])}))  # bank c: b's queries under another name
    assert sum(b for b, _ in calls) == n and {q for _, q in calls} == {1}  # only the missing bank ran
    assert {b: _table(db, f"corpus_{b}").version for b in banks} == versions  # a's and b's tables untouched
    assert (s2["banks"]["c"]["embedded"], s2["banks"]["a"]["embedded"], s2["banks"]["a"]["already_committed"]) == \
        (n, 0, n)
    got = _vectors(_table(db, "corpus_c"))
    for i, v in world["expected_b"].items():
        np.testing.assert_allclose(got[i], v, atol=ATOL, err_msg=f"bank c, {i}")


def test_banks_refused_by_name(world, tmp_path):
    """A bank on another backbone, a bad bank name, a checkpoint and banks together: one line each."""
    from typer.testing import CliRunner

    import cli
    from slq.encoder import SLQEncoder
    from slq.miniature.tiny import build_tiny_backbone
    from slq.mlops.corpus import CorpusError
    from slq.mlops.corpus.embed import EmbedJob, embed_corpus

    other = build_tiny_backbone("qwen2_5_vl", tmp_path / "other_backbone")
    foreign = SLQEncoder.from_pretrained(other, num_queries=4, seed=0).save(tmp_path / "foreign")
    db = str(tmp_path / "db")
    with pytest.raises(CorpusError, match=r"bank 'x' \(.*foreign\) was trained on backbone .* banks embedded in "
                                          r"one pass share one backbone"):
        embed_corpus(EmbedJob(str(world["manifest"]), None, db, engine="local", progress=False,
                              banks={"a": str(world["ckpt"]), "x": str(foreign)}))
    assert not (tmp_path / "db").exists()  # refused before any table is created
    with pytest.raises(CorpusError, match=r"bank name '/bad'"):
        embed_corpus(EmbedJob(str(world["manifest"]), None, db, engine="local", banks={"/bad": str(world["ckpt"])}))
    with pytest.raises(CorpusError, match=r"bank 'gone': checkpoint folder not found"):
        embed_corpus(EmbedJob(str(world["manifest"]), None, db, engine="local", banks={"gone": str(tmp_path / "no")}))

    runner = CliRunner()
    base = ["corpus", "embed", str(world["manifest"]), "--uri", db, "--no-ray", "-p", str(world["params"])]
    res = runner.invoke(cli.app, base + ["--checkpoint", str(world["ckpt"]), "--bank", f"a={world['ckpt']}"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip().startswith("error: give --checkpoint or --bank, not both")
    res = runner.invoke(cli.app, base + ["--bank", "a"])
    assert res.exit_code == 1 and res.stderr.strip() == "error: --bank 'a': expected NAME=PATH"


def test_banks_cli_embed_and_status(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    db = str(tmp_path / "db")
    res = runner.invoke(cli.app, ["corpus", "embed", str(world["manifest"]), "--uri", db, "--no-ray", "--json",
                                  "--bank", f"a={world['ckpt']}", "--bank", f"b={world['ckpt_b']}",
                                  "-p", str(world["params"])])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["table"] == db and set(summary["banks"]) == {"a", "b"}
    res = runner.invoke(cli.app, ["corpus", "status", "--uri", db, "--bank", "a", "--bank", "b", "--json",
                                  "-p", str(world["params"])])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)
    n = len(world["rows"])
    assert {b: (v["rows"], v["checkpoint_hash"]) for b, v in status.items()} == \
        {"a": (n, world["hash"]), "b": (n, world["hash_b"])}
    res = runner.invoke(cli.app, ["corpus", "status", "--uri", db, "--bank", "a", "-p", str(world["params"])])
    assert res.exit_code == 0 and "corpus_a.lance" in res.stdout
