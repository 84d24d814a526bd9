"""CI: the committed dvc.lock matches the committed code, params and metrics.

Run on a clean clone before anything else: every dependency or output that git tracks (code,
params.yaml, the metrics files) must hash as dvc.lock records it. Data and models that only the
DVC cache holds are absent on a clean clone ("deleted") and are not checked here.
"""

import json
import subprocess
import sys

tracked = set(subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split())
status = json.loads(subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True,
                                   text=True, check=True).stdout or "{}")
stale = []
for stage, entries in status.items():
    for entry in entries:
        if not isinstance(entry, dict):
            stale.append(f"{stage}: {entry}")
            continue
        for kind, changes in entry.items():
            for path, change in (changes or {}).items():
                if isinstance(change, dict):  # params: {"train.lr": "modified"}
                    stale += [f"{stage}: {kind} {path}:{k} {v}" for k, v in change.items()]
                else:
                    in_git = path in tracked or any(t.startswith(path.rstrip("/") + "/") for t in tracked)
                    if in_git or change not in ("deleted", "not in cache"):  # absent data is for dvc pull
                        stale.append(f"{stage}: {kind} {path} {change}")
if stale:
    print("dvc.lock does not match the committed files (run the pipeline and commit dvc.lock and metrics/):")
    print("\n".join(f"  {s}" for s in stale))
    sys.exit(1)
print(f"dvc.lock matches the committed code, params and metrics ({len(status)} stage(s) wait for data only)")
