"""The search service with several query banks on one backbone (slq.mlops.bank_set) and answers
from the same weights (slq.mlops.answer), on a live uvicorn server on 127.0.0.1, met by the real
`openai` client and plain HTTP.

A tiny Qwen2-VL backbone; three untrained SLQ checkpoints of different sizes on it: `default` (the
served train.out, with the twelve-scene index), `b` (its own index) and `c` (no index); and one
trained on another backbone, which must be refused by name. The expectation for every bank's
embedding is a separate single-bank SLQEncoder loaded from that bank's checkpoint on its own, not
the multi-bank path under test. Nothing is mocked.
"""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_openai_embeddings import data_uri, image_message
from test_search_service import embed_split, ranked_ids, scene, tiny_project

pytestmark = pytest.mark.integration
pytest.importorskip("fastapi")
pytest.importorskip("lancedb")
openai = pytest.importorskip("openai")

MAX_TEXT, MAX_K, MAX_IMAGE = 200, 12, 200_000
MODEL = "slq-retriever"
TOL = 1e-5
TEXTS = ["a red circle", "a blue square in the middle", "hi"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from slq.checkpoint import checkpoint_hash
    from slq.encoder import SLQEncoder
    from slq.miniature.tiny import build_tiny_backbone
    from slq.mlops.config import load_config
    from slq.mlops.stages import index

    root = tmp_path_factory.mktemp("bankproj")
    cfg, enc, backbone, ckpt = tiny_project(root, MAX_TEXT, MAX_K, MAX_IMAGE, MODEL)
    embed_split(enc, root, cfg, checkpoint_hash(ckpt))
    index.run(cfg)
    ckpts = {"b": SLQEncoder.from_pretrained(backbone, num_queries=3, seed=1).save(root / "checkpoints" / "b", metrics={}),
             "c": SLQEncoder.from_pretrained(backbone, num_queries=6, seed=2).save(root / "checkpoints" / "c", metrics={})}
    cfg_b = load_config(root / "params.yaml", {"train.out": "checkpoints/b", "embed.out": "artifacts/emb_b",
                                               "index.uri": "artifacts/lancedb_b", "index.out": "artifacts/lancedb_b/index.json",
                                               "index.metrics": "metrics/index_b.json"})
    enc_b = SLQEncoder.from_pretrained(str(backbone), queries=ckpts["b"])
    embed_split(enc_b, root, cfg_b, checkpoint_hash(ckpts["b"]))
    index.run(cfg_b)
    other_bb = build_tiny_backbone("qwen2_vl", root / "models" / "other", seed=7)
    ckpts["alien"] = SLQEncoder.from_pretrained(other_bb, num_queries=3, seed=1).save(root / "checkpoints" / "alien",
                                                                                       metrics={})
    # the expectation: each bank alone, as a separate single-bank encoder
    single = {"default": SLQEncoder.from_pretrained(str(backbone), queries=ckpt),
              **{n: SLQEncoder.from_pretrained(str(backbone), queries=ckpts[n]) for n in ("b", "c")}}
    return {"root": root, "cfg": cfg, "enc": enc, "ckpts": ckpts, "single": single, "cfg_b": cfg_b}


@pytest.fixture(scope="module")
def app(project):
    from slq.mlops.service import create_app

    return create_app(project["cfg"], encoder=project["enc"], banks={"b": "checkpoints/b", "c": "checkpoints/c"},
                      bank_indexes={"b": "artifacts/lancedb_b"}, answer=True)


@pytest.fixture(scope="module")
def server(app):
    from live_server import live_server

    with live_server(app, log_level="warning") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def post(server, route: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{server}{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_lists_every_bank_with_its_checkpoint(server, project):
    from slq.checkpoint import checkpoint_hash

    with urllib.request.urlopen(f"{server}/health", timeout=30) as r:
        health = json.loads(r.read())
    assert list(health["banks"]) == ["default", "b", "c"]
    assert health["banks"]["b"] == checkpoint_hash(project["ckpts"]["b"])
    assert health["answer"] is True


def test_one_backbone_in_memory(app, project):
    """Every bank and the answer step run on the served encoder's backbone: one copy of the weights."""
    service = app.state.service
    model = project["enc"].backbone.model
    assert service.banks.multibank.backbone.model is model
    assert app.state.answerer.model is model
    assert all(b.encoder.backbone.model is model for b in service.banks.banks.values())


@pytest.mark.parametrize("kind", ["text", "image", "image+text"])
def test_several_banks_in_one_request_equal_each_bank_alone(client, project, kind):
    imgs = [scene("red", "circle"), scene("blue", "square")]
    if kind == "text":
        inputs, expect = TEXTS, {n: e.encode_text(TEXTS, progress=False) for n, e in project["single"].items()}
    elif kind == "image":
        inputs = [image_message(data_uri(im)) for im in imgs]
        expect = {n: e.encode_image(imgs, progress=False) for n, e in project["single"].items()}
    else:
        inputs = [image_message(data_uri(im), t) for im, t in zip(imgs, ["make it green", "x"])]
        expect = {n: e.encode_multimodal(list(zip(imgs, ["make it green", "x"])), progress=False)
                  for n, e in project["single"].items()}
    asked = ["c", "default", "b"]
    res = client.embeddings.create(model=MODEL, input=inputs, extra_body={"bank": asked})
    assert len(res.data) == len(inputs) * len(asked)
    assert [d.index for d in res.data] == list(range(len(res.data)))
    for d in res.data:
        extra = d.model_extra
        i, bank = extra["input_index"], extra["bank"]
        assert d.index == i * len(asked) + asked.index(bank)
        np.testing.assert_allclose(np.array(d.embedding, dtype=np.float32), expect[bank][i], atol=TOL, rtol=0)
    # the banks differ (else the comparison above could not tell them apart)
    assert np.abs(expect["b"] - expect["c"]).max() > 1e-2


def test_one_bank_and_no_bank(client, project):
    one = client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"bank": "b"})
    np.testing.assert_allclose(np.array([d.embedding for d in one.data], dtype=np.float32),
                               project["single"]["b"].encode_text(TEXTS, progress=False), atol=TOL, rtol=0)
    assert {d.model_extra["bank"] for d in one.data} == {"b"}
    plain = client.embeddings.create(model=MODEL, input=TEXTS)  # OpenAI's response, the served checkpoint
    assert [d.index for d in plain.data] == [0, 1, 2] and not plain.data[0].model_extra
    np.testing.assert_allclose(np.array([d.embedding for d in plain.data], dtype=np.float32),
                               project["single"]["default"].encode_text(TEXTS, progress=False), atol=TOL, rtol=0)


def test_bad_bank_requests_are_refused_in_openais_shape(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="x", extra_body={"bank": ["b", "nope"]})
    assert e.value.body["code"] == "bank_not_found" and "'nope'" in e.value.body["message"]
    for bank, words in ((["b", "b"], "twice"), ([], "empty")):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=MODEL, input="x", extra_body={"bank": bank})
        assert words in e.value.body["message"] and e.value.body["param"] == "bank"
    with pytest.raises(openai.BadRequestError) as e:  # 5 inputs x 3 banks = 15 > index.max_k
        client.embeddings.create(model=MODEL, input=["a"] * 5, extra_body={"bank": ["default", "b", "c"]})
    assert "15 embeddings" in e.value.body["message"]


def test_search_with_a_bank_uses_its_own_index_and_encoder(server, project):
    from slq.checkpoint import checkpoint_hash

    status, out = post(server, "/search", {"text": "a red circle", "k": 5, "bank": "b"})
    assert status == 200, out
    q = project["single"]["b"].encode_text(["a red circle"], progress=False)[0]
    gallery = np.load(project["cfg_b"].path(project["cfg_b"].embed.out) / "test_image.npy")
    assert [h["image_id"] for h in out["hits"]] == ranked_ids(gallery, q, "s", 5)
    assert {h["checkpoint_hash"] for h in out["hits"]} == {checkpoint_hash(project["ckpts"]["b"])}
    status, default = post(server, "/search", {"text": "a red circle", "k": 5})
    assert status == 200 and default["hits"] != out["hits"]
    status, out = post(server, "/search", {"text": "a red circle", "bank": "c"})
    assert status == 404 and "bank 'c' has no index" in out["error"] and "--bank-index c=" in out["error"]
    status, out = post(server, "/search", {"text": "a red circle", "bank": "zzz"})
    assert status == 404 and "unknown bank 'zzz'" in out["error"]


def test_answer_retrieves_with_the_bank_then_generates(server, project):
    status, out = post(server, "/answer", {"question": "where is the red circle?", "k": 3, "max_new_tokens": 5})
    assert status == 200, out
    assert isinstance(out["answer"], str) and out["bank"] == "default"
    assert 1 <= out["usage"]["completion_tokens"] <= 5 and out["usage"]["prompt_tokens"] > 10
    q = project["single"]["default"].encode_text(["where is the red circle?"], progress=False)[0]
    texts = np.load(project["cfg"].path(project["cfg"].embed.out) / "test_text.npy")
    assert [h["id"] for h in out["hits"]] == ranked_ids(texts, q, "c", 3)
    assert all(h["caption"] for h in out["hits"])
    status, b = post(server, "/answer", {"question": "where is the red circle?", "k": 3, "bank": "b",
                                         "max_new_tokens": 5})
    assert status == 200 and b["bank"] == "b"
    for body, status_, words in (({"question": "x", "bank": "c"}, 404, "has no index"),
                                 ({"question": "x", "k": 0}, 422, "k"),
                                 ({"question": "x", "max_new_tokens": 10_000}, 422, "max_new_tokens"),
                                 ({"question": "   "}, 422, "question")):
        got, err = post(server, "/answer", body)
        assert got == status_ and words in err["error"] and "\n" not in err["error"], (body, err)


def test_the_greedy_answer_is_the_models_own_generation(server, project):
    """The endpoint's answer is what transformers' own greedy generate gives, on another loaded copy of
    the backbone, for the prompt written out here by hand (not through slq.mlops.answer)."""
    import torch

    status, out = post(server, "/answer", {"question": "what is blue?", "k": 2, "max_new_tokens": 6})
    assert status == 200
    caps = [h["caption"] for h in out["hits"]]
    user = ("Answer the question using the context. Be brief.\n\nContext:\n"
            f"[1] {caps[0]}\n[2] {caps[1]}\n\nQuestion: what is blue?")
    bb = project["single"]["default"].backbone  # another loaded copy: the reference
    text = bb.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": user}]}],
                                            tokenize=False, add_generation_prompt=True)
    ids = bb.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = bb.model.generate(**ids, max_new_tokens=6, do_sample=False,
                                pad_token_id=bb.tokenizer.pad_token_id or bb.tokenizer.eos_token_id)
    new = gen[0, ids["input_ids"].shape[1]:]
    assert bb.tokenizer.decode(new, skip_special_tokens=True).strip() == out["answer"]
    assert int(new.shape[0]) == out["usage"]["completion_tokens"]
    assert int(ids["input_ids"].shape[1]) == out["usage"]["prompt_tokens"]


def test_a_bank_of_another_backbone_is_refused_by_name(project):
    from slq.mlops.search import SearchError
    from slq.mlops.service import create_app

    with pytest.raises(SearchError, match=r"bank 'alien'"):
        create_app(project["cfg"], encoder=project["enc"], banks={"alien": "checkpoints/alien"})
    with pytest.raises(SearchError, match=r"--bank-index for 'zz': no such bank"):
        create_app(project["cfg"], encoder=project["enc"], bank_indexes={"zz": "artifacts/lancedb_b"})
    with pytest.raises(SearchError, match=r"'default': that name is the served checkpoint"):
        create_app(project["cfg"], encoder=project["enc"], banks={"default": "checkpoints/b"})


def test_cli_bank_options_are_checked_in_one_line(project):
    from typer.testing import CliRunner

    import cli

    params = str(project["root"] / "params.yaml")
    runner = CliRunner()
    res = runner.invoke(cli.app, ["serve", "--bank", "b=checkpoints/b", "-p", params])
    assert res.exit_code == 1 and "--bank applies to --search only" in res.output
    res = runner.invoke(cli.app, ["serve", "--search", "--bank", "nope", "-p", params])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--bank 'nope': no pipeline bank" in res.output and "nope.yaml" in res.output
    res = runner.invoke(cli.app, ["serve", "--search", "--bank", "b=", "-p", params])
    assert res.exit_code == 1 and "--bank 'b=': expected NAME=PATH" in res.output


def test_a_pipeline_bank_by_name_brings_its_checkpoint_and_index(project):
    """`--bank q16`: the bank's params overlay (params/banks/q16.yaml, as dvc.yaml's bank stages run
    it) gives its checkpoint and, once the index stage built it, its index; the service then
    searches with that bank exactly as with the paths given by hand."""
    from fastapi.testclient import TestClient

    from slq.mlops.bank_set import resolve_banks
    from slq.mlops.service import create_app

    root, cfg = project["root"], project["cfg"]
    overlays = root / "params" / "banks"
    overlays.mkdir(parents=True, exist_ok=True)
    (overlays / "b.yaml").write_text("extends: ../../params.yaml\nroot: .\ntrain: {out: checkpoints/b}\n"
                                     "index: {uri: artifacts/lancedb_b}\n")
    (overlays / "c.yaml").write_text("extends: ../../params.yaml\nroot: .\ntrain: {out: checkpoints/c}\n"
                                     "index: {uri: artifacts/lancedb_c_not_built}\n")
    banks, indexes = resolve_banks(cfg, ["b", "c", "x=checkpoints/c"])
    assert banks == {"x": "checkpoints/c", "b": str(root / "checkpoints" / "b"), "c": str(root / "checkpoints" / "c")}
    assert indexes == {"b": str(root / "artifacts" / "lancedb_b")}  # c's index is not built: c embeds only
    assert resolve_banks(cfg, ["b"], ["b=elsewhere"])[1] == {"b": "elsewhere"}  # --bank-index wins
    with pytest.raises(ValueError, match=r"--bank 'b' is given twice"):
        resolve_banks(cfg, ["b=checkpoints/b", "b"])

    by_name = TestClient(create_app(cfg, encoder=project["enc"], banks=banks, bank_indexes=indexes))
    by_hand = TestClient(create_app(cfg, encoder=project["enc"], banks={"b": "checkpoints/b"},
                                    bank_indexes={"b": "artifacts/lancedb_b"}))
    body = {"text": "a red circle", "k": 5, "bank": "b"}
    got, want = by_name.post("/search", json=body), by_hand.post("/search", json=body)
    assert got.status_code == 200 and got.json()["hits"] == want.json()["hits"] and len(got.json()["hits"]) == 5
    assert list(by_name.get("/health").json()["banks"]) == ["default", "x", "b", "c"]
    assert by_name.post("/search", json={**body, "bank": "c"}).status_code == 404  # no index: it embeds only
