"""Reporting of bench records: the console table, CSV, reading records back, side-by-side comparison."""
from __future__ import annotations

import csv
import json

from ..errors import UserError
from ..fsutil import atomic_file
from .harness import RECORD_FORMAT


SUMMARY_FIELDS = ("startup_ms", "first_run_ms", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "max_ms")
CSV_FIELDS = ("name", "path", "variant", "backend", "backend_version", "threads", "cpu_model", "affinity_cpus",
              "model_size_mb", "params", "input_shape", "input_dtype", "import_ms") + SUMMARY_FIELDS + (
              "ratio_to_first", "runs", "load_rss_mb", "peak_rss_mb", "date", "runs_ms")


def format_table(record: dict) -> str:
    s, m = record["settings"], record["machine"]
    lines = [f"{m['cpu_model']} | {s['threads']} thread(s) | CPUs {s['affinity_cpus']} | batch 1 | "
             f"{s['runs']} timed runs after {s['warmup']} warm-up{' | interleaved' if s['interleaved'] else ''} | "
             f"load avg {record['load_avg_before']} | peak RSS {record['peak_rss_mb']:.0f} MB"]
    head = f"{'model':<28} {'backend':<22} {'size MB':>8} {'start ms':>9} {'1st ms':>9} " + \
           " ".join(f"{k:>9}" for k in ("mean ms", "std", "min", "p50", "p90", "max")) + f" {'vs first':>8}"
    lines += [head, "-" * len(head)]
    for e in record["models"]:
        size = "-" if e["model_size_mb"] is None else f"{e['model_size_mb']:.2f}"
        lines.append(f"{e['name'][:28]:<28} {(e['backend'] + ' ' + e['backend_version'])[:22]:<22} {size:>8} "
                     f"{e['startup_ms']:>9.1f} {e['first_run_ms']:>9.1f} " +
                     " ".join(f"{e[k]:>9.2f}" for k in ("mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "max_ms"))
                     + f" {e['ratio_to_first']:>7.2f}x")
    return "\n".join(lines)


def write_csv(record: dict, path: str) -> None:
    """One row per model; `runs_ms` holds every timed run, separated by spaces."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for e in record["models"]:
            row = {k: e.get(k) for k in CSV_FIELDS}
            row.update(cpu_model=record["machine"]["cpu_model"], peak_rss_mb=record["peak_rss_mb"],
                       date=record["date"],
                       affinity_cpus=" ".join(map(str, record["settings"]["affinity_cpus"] or [])),
                       input_shape="x".join(map(str, e["input_shape"])),
                       runs_ms=" ".join(f"{t:.4f}" for t in e["runs_ms"]))
            writer.writerow(row)


def load_record(path: str) -> dict:
    """A JSON record written by `edge-effnet bench --json`, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UserError(f"benchmark record not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not record.get("models"):
        raise UserError(f"{path} is not an `edge-effnet bench --json` record")
    return record


def compare(a: dict, b: dict, a_label: str = "A", b_label: str = "B") -> str:
    """Side by side: models matched by name (else by position), B's mean over A's."""
    def where(r):
        s = r["settings"]
        backends = ", ".join(dict.fromkeys(f"{e['backend']} {e['backend_version']}" for e in r["models"]))
        return (f"{r['machine']['cpu_model']} | {backends} | {s['threads']} thread(s) | CPUs {s['affinity_cpus']} | "
                f"{s['runs']} runs | {r['date']} | load avg {r.get('load_avg_before')}")

    lines = [f"A = {a_label}: {where(a)}", f"B = {b_label}: {where(b)}"]
    head = f"{'model':<28} {'A mean ms':>10} {'B mean ms':>10} {'A p50 ms':>9} {'B p50 ms':>9} {'B / A':>8}"
    lines += [head, "-" * len(head)]
    by_name = {e["name"]: e for e in b["models"]}
    matched = all(e["name"] in by_name for e in a["models"])
    pairs = [(e, by_name.get(e["name"])) for e in a["models"]] if matched else \
        list(zip(a["models"], b["models"]))
    for ea, eb in pairs:
        name = ea["name"] if matched or ea["name"] == eb["name"] else f"{ea['name']} / {eb['name']}"
        lines.append(f"{name[:28]:<28} {ea['mean_ms']:>10.2f} {eb['mean_ms']:>10.2f} {ea['p50_ms']:>9.2f} "
                     f"{eb['p50_ms']:>9.2f} {eb['mean_ms'] / ea['mean_ms']:>7.2f}x")
    if not matched:
        lines.append("(model names differ: matched by position)")
    if len(a["models"]) != len(b["models"]):
        lines.append(f"(A has {len(a['models'])} model(s), B has {len(b['models'])}: unmatched ones left out)")
    return "\n".join(lines)
