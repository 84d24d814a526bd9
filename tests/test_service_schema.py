"""The search service's OpenAPI schema (slq.mlops.service) describes every route's body, answer and
error, and a schema-driven fuzzer (schemathesis, `st run --checks all`) finds nothing on a live
uvicorn server on 127.0.0.1: no 5xx, every response as documented, every status code declared,
schema-valid bodies accepted and schema-invalid ones refused.

A tiny Qwen2-VL backbone, an untrained query checkpoint and a twelve-scene LanceDB index (as
tests/test_search_service.py builds it). Nothing is mocked.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("fastapi")
pytest.importorskip("lancedb")
pytest.importorskip("schemathesis")

MAX_TEXT, MAX_K, MAX_IMAGE = 200, 20, 200_000
MODEL = "slq-retriever"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from test_search_service import embed_split, tiny_project

    from slq.checkpoint import checkpoint_hash
    from slq.mlops.stages import index

    root = tmp_path_factory.mktemp("schemaproj")
    cfg, enc, _, ckpt = tiny_project(root, MAX_TEXT, MAX_K, MAX_IMAGE, MODEL)
    embed_split(enc, root, cfg, checkpoint_hash(ckpt))
    index.run(cfg)
    return {"root": root, "cfg": cfg, "enc": enc}


@pytest.fixture(scope="module")
def server(project):
    """A live uvicorn server on 127.0.0.1 (a free port), stopped when the module is done."""
    from live_server import live_server

    from slq.mlops.service import create_app

    with live_server(create_app(project["cfg"], encoder=project["enc"]), log_level="critical") as url:
        yield url


def test_every_route_documents_its_body_answer_and_errors(server):
    with urllib.request.urlopen(f"{server}/openapi.json", timeout=30) as r:
        spec = json.load(r)
    paths = spec["paths"]
    assert set(paths) == {"/health", "/search", "/v1/embeddings"}
    search = paths["/search"]["post"]
    body = search["requestBody"]["content"]["application/json"]["schema"]
    assert search["requestBody"]["required"] is True
    assert [v["title"] for v in body["oneOf"]] == ["TextQuery", "ImageQuery", "ImagePathQuery"]
    k = body["oneOf"][0]["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, MAX_K)
    assert set(search["responses"]) == {"200", "403", "404", "409", "413", "422", "500"}
    assert "schema" in search["responses"]["200"]["content"]["application/json"]
    assert set(paths["/v1/embeddings"]["post"]["responses"]) == {"200", "400", "403", "404", "422", "500"}
    assert "requestBody" in paths["/v1/embeddings"]["post"]
    assert set(paths["/health"]["get"]["responses"]) == {"200", "500"}
    for route in paths.values():
        for op in route.values():
            for status, resp in op["responses"].items():
                assert "schema" in resp["content"]["application/json"], (status, op["summary"])


def test_schemathesis_finds_nothing(server, tmp_path):
    """`st run --checks all` against the live server, bounded: a few dozen cases per operation."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json", "--checks", "all",
           "--max-examples", "25", "--seed", "1", "--workers", "1", "--phases", "examples,coverage,fuzzing",
           "--request-timeout", "60", "--generation-database", "none", "--no-color"]
    here = os.path.dirname(__file__)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-8000:]
    assert "No issues found" in out or "passed" in out, out[-4000:]
    print(f"schemathesis: {time.perf_counter() - t0:.1f} s\n{out[-1500:]}")
