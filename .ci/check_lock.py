"""CI: the committed dvc.lock matches the committed code, params and metrics.

Run on a clean clone before anything else: every dependency or output that git tracks (code,
params.yaml, the metrics files) must hash as dvc.lock records it. Data and models that only the
DVC cache holds are absent on a clean clone ("deleted") and are not checked here.

Every DVC project in the repository is checked: the project folder's and each folder with a
.dvc/config that git holds or would hold (not ignored): pipelines/smollm2, a DVC project of its
own, which the project folder's plain `dvc status` skips. `python .ci/check_lock.py DIR ...`
checks only those.
"""

import json
import os
import subprocess
import sys


def git_files(*args):
    return set(subprocess.run(["git", "ls-files", *args], capture_output=True, text=True, check=True).stdout.split())


tracked = git_files()
# the DVC projects below this one: a .dvc/config that git holds (or would: not ignored)
projects = sys.argv[1:] or ["."] + sorted(os.path.dirname(os.path.dirname(p)) for p in
                                          git_files("--cached", "--others", "--exclude-standard")
                                          if p.endswith("/.dvc/config"))
stale, waiting = [], 0
for project in projects:
    status = json.loads(subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project,
                                       capture_output=True, text=True, check=True).stdout or "{}")
    waiting += len(status)
    label = "" if project == "." else f"{project}: "
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                stale.append(f"{label}{stage}: {entry}")
                continue
            for kind, changes in entry.items():
                for path, change in (changes or {}).items():
                    if isinstance(change, dict):  # params: {"train.lr": "modified"}
                        stale += [f"{label}{stage}: {kind} {path}:{k} {v}" for k, v in change.items()]
                        continue
                    # as git names it: DVC gives a path outside the project it runs in as an absolute one
                    rel = os.path.relpath(os.path.join(project, path)).replace(os.sep, "/")
                    in_git = rel in tracked or any(t.startswith(rel.rstrip("/") + "/") for t in tracked)
                    if in_git or change not in ("deleted", "not in cache"):  # absent data is for dvc pull
                        stale.append(f"{label}{stage}: {kind} {rel} {change}")
if stale:
    print("dvc.lock does not match the committed files (run the pipeline and commit dvc.lock and metrics/):")
    print("\n".join(f"  {s}" for s in stale))
    sys.exit(1)
print(f"dvc.lock matches the committed code, params and metrics in {len(projects)} DVC project(s) "
      f"({', '.join(projects)}; {waiting} stage(s) wait for data only)")
