"""The search service with several query banks: answers from the same weights (resident memory) and
behaviour under load (locust), on a project where the pipeline has run.

    python bench/bench_serve.py --out bench/results/serve_cpu.json [--locust /path/to/locust]
    python bench/bench_serve.py -p pipelines/smollm2/params.yaml --banks 1 --no-load ...   # another backbone

For each bank count K (default 1 and 4): the service (`slq serve --search --answer`, uvicorn, one
process) is started with the pipeline's checkpoint as bank `default` and K - 1 more banks (fresh
SLQ banks of the same size on the same backbone, written to a temporary folder: what they were
trained on does not change what they cost). Then:

  * memory: the server process's resident memory (VmRSS, and its peak VmHWM) after start, after
    warm-up retrieval (/search and /v1/embeddings, every bank), and after /answer requests
    (retrieval + greedy generation with the same loaded model); beside them the backbone's weight
    bytes, i.e. what a second copy for generation would add;
  * load (unless --no-load): locust, headless, `--users` clients for `--seconds`
    (bench/locustfile.py: /v1/embeddings of two captions with every bank, and /search), p50/p95
    latency per route, throughput, failures, and the server's resident memory after.

locust is not a project dependency (it pins its own Flask); install it anywhere, e.g.
`python -m venv /tmp/locust && /tmp/locust/bin/pip install locust`, and pass --locust.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def status_kib(pid: int | str) -> dict:
    """VmRSS and VmHWM of process `pid` ("self": this one) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_mib": round(out["VmRSS"] / 1024, 1), "peak_mib": round(out["VmHWM"] / 1024, 1)}


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_banks(served, n: int, work: Path) -> dict[str, Path]:
    """n fresh banks shaped like the served checkpoint, on its backbone and with its prompts."""
    from slq.encoder import SLQEncoder

    banks = {}
    for i in range(n):
        enc = SLQEncoder.fresh(served.backbone, num_queries=served.queries.num_queries, seed=100 + i,
                               prompts=served.prompts)
        banks[f"bank{i + 1}"] = enc.save(work / f"bank{i + 1}", metrics={})
    return banks


def serve(params: Path, banks: dict[str, Path], port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "cli.py"), "serve", "--search", "--answer", "--port", str(port),
            "-p", str(params)]
    for name, path in banks.items():
        args += ["--bank", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=params.parent if params.parent != Path("") else Path("."), env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return proc if r.status == 200 else None
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the service did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def run_locust(locust: str, url: str, banks: list[str], model: str, users: int, seconds: int, work: Path) -> dict:
    prefix = work / "locust"
    env = {**os.environ, "SLQ_BANKS": ",".join(banks), "SLQ_MODEL": model}
    cmd = [locust, "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "--host", url, "-u", str(users),
           "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    stats = prefix.with_name("locust_stats.csv")
    if not stats.exists():
        raise SystemExit(f"locust wrote no stats (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rows = {}
    with stats.open() as f:
        for r in csv.DictReader(f):
            rows[r["Name"]] = {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                               "p50_ms": float(r["50%"]), "p95_ms": float(r["95%"]),
                               "mean_ms": round(float(r["Average Response Time"]), 1),
                               "requests_per_s": round(float(r["Requests/s"]), 2)}
    agg = rows.get("Aggregated", {})
    agg["error_rate"] = round(agg["failures"] / max(1, agg["requests"]), 4) if agg else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--banks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--answers", type=int, default=5, help="/answer requests before the memory reading")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--no-load", action="store_true", help="memory only, no locust run")
    ap.add_argument("--locust", default=shutil.which("locust") or "locust")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from slq.mlops.config import load_config

    params = args.params.resolve()
    cfg = load_config(params)
    if not cfg.path(cfg.train.out).is_dir() or not cfg.path(cfg.index.uri).is_dir():
        raise SystemExit(f"no checkpoint ({cfg.train.out}) or index ({cfg.index.uri}) under {cfg.root}: run the "
                         "pipeline first (bash run.sh pipeline)")
    result = {"what": "the search service with K banks: resident memory with retrieval and with answers; locust load",
              "params": str(args.params), "backbone": cfg.backbone.path, "machine": platform.node(),
              "cpus": os.cpu_count(), "users": args.users, "seconds": args.seconds,
              "runs": []}
    from slq.mlops.models import load_encoder

    served = load_encoder(cfg, queries=cfg.path(cfg.train.out))  # (as the service loads it)
    result["weight_mib"] = round(sum(p.numel() * p.element_size() for p in served.backbone.model.parameters())
                                 / 2**20, 1)  # what a second copy of the model for generation would hold
    questions = ["where is the red circle?", "what is next to the blue square?", "what shape is green?",
                 "is there a star?", "what is on the left?"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        extra = make_banks(served, max(args.banks) - 1, work)
        for k in args.banks:
            banks = dict(list(extra.items())[:k - 1])
            names = ["default", *banks]
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = serve(params, banks, port, work / f"serve_{k}.log")
            try:
                run = {"banks": k, "started": status_kib(proc.pid)}
                for q in questions * 2:  # retrieval: every bank, both routes
                    post(f"{url}/search", {"text": q, "k": 10})
                    post(f"{url}/v1/embeddings", {"model": cfg.register.model_name, "input": [q, q + " now"],
                                                  **({"bank": names} if k > 1 else {})})
                run["after_retrieval"] = status_kib(proc.pid)
                t0 = time.perf_counter()
                answers = [post(f"{url}/answer", {"question": q, "k": 3, "max_new_tokens": args.max_new_tokens})
                           for q in (questions * 3)[:args.answers]]
                run["answer_s_mean"] = round((time.perf_counter() - t0) / max(1, len(answers)), 3)
                run["after_answers"] = status_kib(proc.pid)
                run["answer_example"] = {"question": questions[0], "answer": answers[0]["answer"],
                                         "context": [h["caption"] for h in answers[0]["hits"]]}
                run["answer_added_mib"] = round(run["after_answers"]["rss_mib"] - run["after_retrieval"]["rss_mib"], 1)
                if not args.no_load:
                    run["load"] = run_locust(args.locust, url, names, cfg.register.model_name, args.users,
                                             args.seconds, work)
                    run["after_load"] = status_kib(proc.pid)
                result["runs"].append(run)
                print(json.dumps(run, indent=1))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
