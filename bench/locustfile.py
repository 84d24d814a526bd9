"""Locust clients for the search service with its banks (bench/bench_serve.py starts the service and
runs this headless; `locust -f bench/locustfile.py --host http://127.0.0.1:5002` runs it by hand).

SLQ_BANKS (comma-separated, default "default") names the banks the service serves: each embeddings
request asks for all of them (one pass over its inputs), each search request uses the served
checkpoint's index. Captions are drawn from a fixed list, so runs compare.
"""

import os
import random

from locust import HttpUser, between, task

BANKS = [b for b in os.environ.get("SLQ_BANKS", "default").split(",") if b]
MODEL = os.environ.get("SLQ_MODEL", "slq-retriever")
CAPTIONS = [
    "a red circle to the left of a blue square",
    "a small green triangle above a yellow star",
    "two purple squares and an orange circle",
    "a big blue star in the middle",
    "a white circle below a red triangle",
    "an orange square to the right of a green circle",
]


class ServiceUser(HttpUser):
    wait_time = between(0.0, 0.05)

    @task(3)
    def embeddings(self):
        body = {"model": MODEL, "input": random.sample(CAPTIONS, 2)}
        if len(BANKS) > 1:
            body["bank"] = BANKS
        with self.client.post("/v1/embeddings", json=body, name=f"/v1/embeddings x{len(BANKS)} banks",
                              catch_response=True) as r:
            if r.status_code != 200 or len(r.json()["data"]) != 2 * len(BANKS):
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def search(self):
        with self.client.post("/search", json={"text": random.choice(CAPTIONS), "k": 10}, name="/search",
                              catch_response=True) as r:
            if r.status_code != 200 or len(r.json()["hits"]) != 10:
                r.failure(f"{r.status_code}: {r.text[:200]}")
