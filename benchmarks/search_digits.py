"""The compound-coefficient search (paper step 1) on a real labeled set: scikit-learn's digits.

The 1797 8x8 grayscale digits (or --per-class of each) are upsampled to 32 x 32 RGB PNGs and
written as a class-folder image set; `edge-effnet search` then runs in a fresh process exactly
as a user runs it, and this script checks and records the outcome:

- wall time of the whole search and the CPU time it used (on a shared machine the load average
  is recorded before and after, so a reader can judge how much of the wall time was waiting);
- every candidate's MACs as recorded equal the analytic count (scaling.count_macs) and the count
  read from the built Keras model (the search itself refuses to go on when they differ);
- held-out accuracy of every candidate against chance (10%).

Outputs: benchmarks/results/search_digits.{md,json,png} (with the provenance block,
benchmarks/_common.py). The search runs under the benchmark lock (--lock or $EDGE_EFFNET_BENCH_LOCK):

    python benchmarks/search_digits.py [--lock FILE] [--per-class 100] [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _common

ROOT = _common.ROOT
sys.path.insert(0, os.path.join(ROOT, "tools"))
NAME = "search_digits"

from digits_folder import write_digits

from edge_effnet.model.scaling import count_macs
from edge_effnet.train.search import SearchConfig, candidate_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=60, help="digits per class (the set has ~180)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grid-step", type=float, default=0.2)
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--base-resolution", type=int, default=32)
    parser.add_argument("--family", default="efficientnet")
    parser.add_argument("--keep", help="keep the run folder here")
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for search_digits.{md,json,png}")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="search-digits-")
    data, run_dir = os.path.join(work, "digits"), args.keep or os.path.join(work, "run")
    images = write_digits(data, size=args.base_resolution, per_class=args.per_class)
    cmd = [sys.executable, "-m", "edge_effnet", "search", "--data", data, "--grid-step", str(args.grid_step),
           "--tolerance", str(args.tolerance), "--base-resolution", str(args.base_resolution),
           "--family", args.family, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "-o", run_dir]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with _common.bench_lock(args.lock):  # the wall time is a measurement
        run = _common.start()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        provenance = run.finish()
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    with open(os.path.join(run_dir, "results.json")) as f:
        report = json.load(f)

    config = SearchConfig(base_resolution=args.base_resolution, family=args.family)
    checks = []
    for r in report["ranking"]:
        analytic = count_macs(candidate_spec(r["alpha"], r["beta"], r["gamma"], config), num_classes=10)
        checks.append(dict(key=r["key"], macs=r["macs"], macs_model=r["macs_model"], analytic=analytic,
                           equal=r["macs"] == r["macs_model"] == analytic))
    accuracies = [r["accuracy"] for r in report["ranking"]]
    record = dict(
        search_command=" ".join(["edge-effnet"] + cmd[3:]).replace(data, "DIGITS").replace(run_dir, "RUN"),
        data=dict(source="sklearn.datasets.load_digits", images=images, per_class=args.per_class,
                  size=f"{args.base_resolution}x{args.base_resolution} RGB (bicubic from 8x8)"),
        candidates=len(report["ranking"]), wall_s=round(wall_s, 1),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1), under_15_min=wall_s < 900,
        macs_checks=checks, all_macs_equal=all(c["equal"] for c in checks),
        accuracy_min=min(accuracies), accuracy_max=max(accuracies), chance=0.1,
        best=report["best"], step2=report["step2"], ranking=report["ranking"], normalizer=report["normalizer"])
    for r in record["ranking"]:
        r.pop("history", None)
    os.makedirs(args.out, exist_ok=True)
    shutil.copyfile(os.path.join(run_dir, "accuracy_vs_cost.png"), os.path.join(args.out, "search_digits.png"))
    with open(os.path.join(run_dir, "results.md")) as f:
        table = f.read().split("\n", 2)[2]
    md = [
        "# Compound-coefficient search on scikit-learn's digits",
        "",
        f"The provenance above brackets the search alone: a load average over {provenance['machine']['cpu_count']} "
        "(the core count) means other work was running.",
        "",
        f"Data: {images} digits ({args.per_class} per class), 8x8 upsampled to {args.base_resolution} px RGB; "
        "20% of every class held out.",
        f"Search command: `{record['search_command']}`",
        "",
        f"**{len(accuracies)} candidates in {wall_s / 60:.1f} min wall** ({'under' if wall_s < 900 else 'over'} "
        f"15 min), {record['cpu_s'] / 60:.1f} min of CPU time. Held-out accuracy "
        f"{min(accuracies):.1%} - {max(accuracies):.1%} (chance 10%). Recorded MACs equal the analytic "
        f"count and the built model's count for every candidate: {record['all_macs_equal']}.",
        "",
        table.strip(),
        "",
        "![accuracy vs MACs](search_digits.png)",
        "",
    ]
    _common.write_results(NAME, record, "\n".join(md), provenance, args.out)
    print("\n".join(md))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if record["all_macs_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
