"""Train and evaluate the default folder recipe on real defect datasets; one results table.

    python benchmarks/real_data.py --runs=RUNS_DIR NAME=PATH [NAME=PATH ...]

Each PATH is an MVTec-layout category folder, or a folder of them (one unified model), laid out
by the scripts in `benchmarks/datasets/` (Magnetic Tile is `../shared/datasets/magnetic_tile`).
For each, this runs the README's own command

    python -m grad_jax.main --config=configs/folder.py --config.data.root=PATH --workdir=RUNS/NAME

(extra `--config.*` overrides with --override=...), timing it as a whole (training, the memory
bank, calibration and evaluation of every model kind), and collects from its metrics.json, for
every model kind (grad, knn, grad+knn), the mean image and pixel AUROC, pixel AUPRO, the
false-alarm rate measured on the good test images at the applied thresholds beside the rate the
thresholds guarantee, and the miss rate. It writes `RUNS/real_data.json` and prints a Markdown
table. A run folder that already holds metrics.json is not trained again (its time is read from
the record of the earlier run), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

from grad_jax.evaluation.metrics import KIND_COLUMNS as COLUMNS

KINDS = ("grad", "knn", "grad+knn")


def run_one(name: str, root: str, runs: pathlib.Path, overrides: list[str]) -> dict:
    workdir = runs / name
    record_path = workdir / "benchmark_run.json"
    if (workdir / "metrics.json").exists() and record_path.exists():
        record = json.loads(record_path.read_text())
    else:
        cmd = [
            sys.executable, "-m", "grad_jax.main", "--config=configs/folder.py",
            f"--config.data.root={root}", f"--workdir={workdir}", *overrides,
        ]  # fmt: skip
        start = time.time()
        done = subprocess.run(cmd, check=False)
        record = {
            "command": " ".join(cmd[1:]),
            "seconds": time.time() - start,
            "returncode": done.returncode,
            "load_average": os.getloadavg(),
        }
        workdir.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1))
        if done.returncode:
            raise SystemExit(f"{name}: the run failed ({done.returncode}); see its output above")
    metrics = json.loads((workdir / "metrics.json").read_text())
    kinds = {k: _means(v) for k, v in (metrics.get("kinds") or {}).items()}
    return {"name": name, "root": root, **record, "kind": metrics.get("kind"), "kinds": kinds}


def _means(values: dict) -> dict:
    out = {}
    for key, _ in COLUMNS:
        v = values.get(f"mean/{key}")
        out[key] = None if v in (None, "n/a") else float(v)
    return out


def _cell(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def table(results: list[dict]) -> str:
    head = "| dataset | kind | " + " | ".join(t for _, t in COLUMNS) + " | minutes |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in results:
        for kind in KINDS:
            values = r["kinds"].get(kind)
            if values is None:
                continue
            cells = " | ".join(_cell(values[k]) for k, _ in COLUMNS)
            minutes = f"{r['seconds'] / 60:.0f}" if kind == KINDS[0] else ""
            rows.append(f"| {r['name']} | {kind} | {cells} | {minutes} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="folder for the run folders and results")
    parser.add_argument("--override", action="append", default=[], help="--config.x=y, repeated")
    parser.add_argument("datasets", nargs="+", help="NAME=PATH")
    args = parser.parse_args()
    runs = pathlib.Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.datasets:
        name, _, root = spec.partition("=")
        if not root or not os.path.isdir(root):
            raise SystemExit(f"{spec}: give NAME=PATH with an existing folder")
        results.append(run_one(name, root, runs, args.override))
        (runs / "real_data.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
