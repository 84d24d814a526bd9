"""POST /v1/embeddings (slq.mlops.openai_api) as the real `openai` client meets it, on a live uvicorn
server on 127.0.0.1 that the module starts and stops.

A tiny Qwen2-VL backbone, an untrained query checkpoint and an empty LanceDB folder: embeddings need
no index tables. Nothing is mocked.
"""

import base64

import numpy as np
import pytest
from PIL import Image
from test_search_service import png_b64, scene, tiny_project

pytestmark = pytest.mark.integration
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

MAX_TEXT, MAX_K, MAX_IMAGE = 200, 8, 200_000
MODEL = "slq-retriever"


def data_uri(im: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(im)


def image_message(url: str, text: str | None = None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("openaiproj")
    cfg, enc, _, _ = tiny_project(root, MAX_TEXT, MAX_K, MAX_IMAGE, MODEL)
    (root / "data" / "images").mkdir(parents=True)
    scene("green", "square").save(root / "data" / "images" / "g.png")
    cfg.path(cfg.index.uri).mkdir(parents=True)  # an empty index: /search has no tables, embeddings need none
    return {"root": root, "cfg": cfg, "enc": enc}


@pytest.fixture(scope="module")
def server(project):
    """A live uvicorn server on 127.0.0.1 (a free port), stopped when the module is done."""
    from live_server import live_server

    from slq.mlops.service import create_app

    with live_server(create_app(project["cfg"], encoder=project["enc"]), log_level="warning") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def as_array(res) -> np.ndarray:
    return np.array([d.embedding for d in res.data], dtype=np.float32)


def ntokens(project, texts) -> int:
    tok = project["enc"].backbone.tokenizer
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


# ---- answers ---------------------------------------------------------------------------------
def test_texts_as_floats_equal_encode_text(client, project):
    texts = ["a red circle", "a blue square on a gray ground"]
    res = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert res.object == "list" and res.model == MODEL
    assert [d.index for d in res.data] == [0, 1] and all(d.object == "embedding" for d in res.data)
    want = project["enc"].encode_text(texts, progress=False)
    np.testing.assert_allclose(as_array(res), want, atol=1e-6)
    assert res.usage.prompt_tokens == res.usage.total_tokens == ntokens(project, texts) > 0


def test_base64_decodes_to_the_same(client, project, server):
    import httpx

    texts = ["a red circle", "a blue square on a gray ground"]
    want = project["enc"].encode_text(texts, progress=False)
    res = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    np.testing.assert_allclose(as_array(res), want, atol=1e-6)
    r = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "base64"},
                   timeout=120)
    assert r.status_code == 200, r.text
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    single = client.embeddings.create(model=f"{MODEL}@champion", input="a red circle", encoding_format="float")
    assert len(single.data) == 1 and single.model == f"{MODEL}@champion"
    np.testing.assert_allclose(as_array(single)[0], project["enc"].encode_text(["a red circle"], progress=False)[0],
                               atol=1e-6)


def test_images_and_image_plus_text(client, project, server):
    import httpx

    enc = project["enc"]
    red, blue = scene("red", "circle"), scene("blue", "square")
    res = client.embeddings.create(model=MODEL, encoding_format="float", input=[
        image_message(data_uri(red)),
        image_message(data_uri(blue), "make it green"),
        image_message("images/g.png"),
    ])
    got = as_array(res)
    np.testing.assert_allclose(got[0], enc.encode_image([red], progress=False)[0], atol=1e-6)
    np.testing.assert_allclose(got[1], enc.encode_multimodal([(blue, "make it green")], progress=False)[0], atol=1e-6)
    green = Image.open(project["root"] / "data" / "images" / "g.png").convert("RGB")
    np.testing.assert_allclose(got[2], enc.encode_image([green], progress=False)[0], atol=1e-6)
    assert res.usage.prompt_tokens == ntokens(project, ["make it green"])
    # vLLM's chat form: a top-level `messages`, one embedding
    r = httpx.post(f"{server}/v1/embeddings", timeout=120, json={
        "model": MODEL, "messages": [image_message(data_uri(blue), "make it green")]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], got[1], atol=1e-6)


# ---- refusals --------------------------------------------------------------------------------
def openai_error(exc) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a red circle")
    err = openai_error(e.value)
    assert err["code"] == "model_not_found" and err["param"] == "model" and MODEL in err["message"]


def test_bad_requests_are_400_in_openai_shape(client, project):
    cases = [
        ({"input": "x" * (MAX_TEXT + 1)}, "index.max_text_chars", "context_length_exceeded"),
        ({"input": ["a"] * (MAX_K + 1)}, "index.max_k", "too_many_inputs"),
        ({"input": "   "}, "is empty", "invalid_value"),
        ({"input": [], }, "empty list", None),
        ({"input": "a", "dimensions": 16}, "Matryoshka", "unsupported_dimensions"),
        ({"input": [image_message("data:image/png;base64," + "A" * (MAX_IMAGE * 2))]}, "index.max_image_bytes",
         "image_too_large"),
        ({"input": [image_message("https://example.com/a.png")]}, "not fetched", None),
        ({"input": [image_message("data:image/png;base64,bm90IGFuIGltYWdl")]}, "cannot be decoded", None),
        ({"input": [image_message(data_uri(scene("red", "circle"))) | {"content": [
            {"type": "image_url", "image_url": {"url": data_uri(scene("red", "circle"))}}] * 2}]}, "at most one", None),
    ]
    for kw, words, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=MODEL, **kw)
        err = openai_error(e.value)
        assert e.value.status_code == 400 and words in err["message"], (kw.keys(), err)
        assert err["type"] == "invalid_request_error" and (code is None or err["code"] == code), err
    full = project["enc"].backbone.hidden_size
    assert len(client.embeddings.create(model=MODEL, input="a", dimensions=full, encoding_format="float")
               .data[0].embedding) == full


def test_paths_outside_the_image_root_are_refused(client, project):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.embeddings.create(model=MODEL, input=[image_message("../params.yaml")])
    assert "'..' is not allowed" in openai_error(e.value)["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=MODEL, input=[image_message(str(project["root"] / "params.yaml"))])


def test_schema_errors_are_422_in_openai_shape(server):
    import httpx

    for body, words in [({"input": "a"}, "model"), ({"model": MODEL, "input": "a", "colour": 1}, "unknown field"),
                        ({"model": MODEL, "input": "a", "encoding_format": "int8"}, "encoding_format")]:
        r = httpx.post(f"{server}/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err


def test_a_body_over_the_cap_is_413_while_it_streams(server, project):
    """The body is counted as it arrives: declared too large, or chunked with no length, it is
    refused with 413 in OpenAI's shape before it is parsed; under the cap it is answered."""
    import httpx

    from slq.mlops.service import body_limit

    cap = MAX_K * body_limit(project["cfg"])
    url = f"{server}/v1/embeddings"
    declared = httpx.post(url, content=b" " * (cap + 1), headers={"content-type": "application/json"}, timeout=60)
    sent = []

    def chunks():  # no Content-Length: chunked transfer, over the cap by 1 MB
        for _ in range(cap // 2**20 + 2):
            sent.append(1)
            yield b" " * 2**20

    try:
        streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
        statuses = {streamed.status_code}
    except httpx.HTTPError:  # the server answered 413 and closed while the client still sent: refused too
        statuses = {413}
    for r in (declared,):
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and f"{cap:,} bytes" in err["message"], err
    assert statuses == {413}
    ok = httpx.post(url, json={"model": MODEL, "input": "a red circle"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_openapi_describes_the_route(server):
    import httpx

    spec = httpx.get(f"{server}/openapi.json", timeout=60).json()
    op = spec["paths"]["/v1/embeddings"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/EmbeddingRequest") and op["requestBody"]["required"]
    fields = spec["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert {"model", "input", "messages", "encoding_format", "dimensions", "user"} <= set(fields)
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbeddingResponse")
    for status in ("400", "404", "422"):
        assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
