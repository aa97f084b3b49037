"""Latency harness: batch-1 timing of exported models (and Keras variants) on a pinned core.

Timing a .tflite file imports only numpy and the interpreter (through runtime.py), so this
runs on a Raspberry Pi with `pip install edge-effnet[runtime]`. Keras variants import
TensorFlow only when one is asked for.

The phases are kept apart, as TFLite's benchmark_model does: backend import, start-up
(load + allocate), first run, warm-up runs, then exactly `runs` timed runs. Several models
are timed interleaved (A B A B ...) so their ratios hold on a noisy machine. Timing
(`benchmark`) returns a plain record; reporting (`format_table`, `write_json`, `write_csv`,
`compare`) only reads it. Every field carries its unit: `_ms`, `_mb`, `_s`.

numpy and the runtime are imported inside functions so the CLI can read BenchOptions' defaults
for --help without them.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Callable

from . import __version__
from .backends import BACKENDS, MODEL_EXTENSIONS
from .errors import UserError
from .fsutil import atomic_file

RECORD_FORMAT = "edge-effnet-bench"
RECORD_VERSION = 1
MB = 1e6  # sizes are in megabytes of 10^6 bytes


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """How to time. The paper's Table 4: batch 1, one core, average of 20 runs."""

    runs: int = 20  # exactly this many timed runs per model, no minimum-seconds rule
    warmup: int = 2  # untimed runs after the first run (its time is recorded apart)
    threads: int = 1  # interpreter / TensorFlow intra-op threads
    cpu: int | None = None  # pin the whole process to this CPU (os.sched_setaffinity)
    backend: str = "auto"
    seed: int = 0  # for the random input pixels (latency does not depend on them)

    def validate(self) -> None:
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1 (got {self.runs})")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more (got {self.warmup})")
        if self.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {self.threads})")
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.cpu is not None:
            if not hasattr(os, "sched_setaffinity"):
                raise UserError("--cpu needs os.sched_setaffinity (Linux)")
            allowed = sorted(os.sched_getaffinity(0))
            if self.cpu not in allowed:
                raise UserError(f"--cpu {self.cpu}: this process may only run on CPUs {allowed}")


@dataclasses.dataclass(frozen=True)
class Target:
    """One thing to time: a model file, or a variant built in Keras (batch 1) and run in TensorFlow."""

    name: str
    backend: str
    path: str | None = None
    variant: str | None = None


def _expand_folders(items: list[str], backend: str) -> list[str]:
    """A folder (an export bundle) stands for its model files of one type: those `backend` runs,
    or with auto its .tflite files (else .onnx, else .keras), so a device with only the
    runtime extra never meets a file it cannot open."""
    from .backends import BACKEND_TABLE

    exts = MODEL_EXTENSIONS if backend == "auto" else (BACKEND_TABLE.get(backend, ("",))[0],)
    out = []
    for item in items:
        if not os.path.isdir(item):
            out.append(item)
            continue
        files = sorted(f for f in os.listdir(item) if os.path.isfile(os.path.join(item, f)))
        found = next(([os.path.join(item, f) for f in files if f.lower().endswith(ext)] for ext in exts
                      if any(f.lower().endswith(ext) for f in files)), None)
        if not found:
            raise UserError(f"no model files ({', '.join(exts)}) in folder {item}")
        out += found
    return out


def resolve_targets(items: list[str], backend: str = "auto") -> list[Target]:
    """Model files, bundle folders or variant names -> targets, checked cheaply (no model is opened here)."""
    if not items:
        raise UserError("name at least one model file (.tflite, .onnx, .keras) or variant (b0..b7, lite0, ...)")
    from . import runtime

    targets = []
    for item in _expand_folders(items, backend):
        ext = os.path.splitext(item)[1].lower()
        if os.path.exists(item) or ext in MODEL_EXTENSIONS or os.sep in item:
            if not os.path.isfile(item):
                raise UserError(f"model file not found: {item}")
            targets.append(Target(os.path.basename(item), runtime.backend_for(item, backend), path=item))
            continue
        from .variants import get_variant

        try:
            spec = get_variant(item)
        except UserError as exc:
            raise UserError(f"{item} is neither a model file nor a variant: {exc}") from None
        if backend not in ("auto", "keras"):
            raise UserError(f"variant {spec.name} is timed in TensorFlow (backend keras); to time it in "
                            f"{backend}, export it first and bench the file")
        targets.append(Target(spec.name, "keras", variant=spec.name))
    names = [t.name for t in targets]
    for i, name in enumerate(names):  # keep rows apart in tables and --compare
        if names.count(name) > 1:
            targets[i] = dataclasses.replace(targets[i], name=f"{name}#{names[:i + 1].count(name)}")
    return targets


# ---------------------------------------------------------------- machine facts

def cpu_model() -> str:
    """The CPU's name: x86 'model name', a Raspberry Pi's 'Model', else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        for key in ("model name", "model", "hardware", "cpu model"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    import numpy as np

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "edge_effnet": __version__}


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, because ru_maxrss starts from the
    parent's size at fork (a benchmark launched by a big process would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB


def set_affinity(cpus: set[int]) -> None:
    """Let every thread of this process run on `cpus` only; threads started later inherit it."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # a thread that just ended


def pin_to_cpu(cpu: int) -> None:
    """Pin every thread of this process to `cpu`."""
    set_affinity({cpu})
    if os.sched_getaffinity(0) != {cpu}:
        raise UserError(f"could not pin to CPU {cpu}")


def applied_affinity() -> list[int] | None:
    """The CPUs any thread of this process may run on (read back, not assumed)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = set(os.sched_getaffinity(0))
    if os.path.isdir("/proc/self/task"):
        for tid in os.listdir("/proc/self/task"):
            try:
                cpus |= os.sched_getaffinity(int(tid))
            except OSError:
                pass
    return sorted(cpus)


# ---------------------------------------------------------------- timing

def make_input(spec: dict, seed: int = 0):
    """Random raw pixels of the input's shape and type (unknown dimensions become 1)."""
    import numpy as np

    shape = [d if d and d > 0 else 1 for d in spec["shape"]]
    dtype = np.dtype(spec["dtype"])
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return rng.uniform(0, 255, size=shape).astype(dtype)


def _ms(ns: int) -> float:
    return ns / 1e6


def _open(target: Target, threads: int):
    from . import runtime

    if target.path is not None:
        return runtime.open_model(target.path, target.backend, threads)
    from .models import create_model
    from .variants import get_variant

    model = create_model(get_variant(target.variant), batch_size=1)  # static batch 1, as exported
    return runtime.KerasRunner(None, threads, model=model)


def _describe(target: Target, runner) -> dict:
    entry = {"name": target.name, "source": "file" if target.path else "variant", "path": target.path,
             "variant": target.variant, "backend": runner.backend, "backend_version": runner.version,
             "model_size_mb": round(os.path.getsize(target.path) / MB, 3) if target.path else None,
             "params": None, "macs": None, "input_shape": list(runner.inputs[0]["shape"]),
             "input_dtype": runner.inputs[0]["dtype"]}
    if getattr(runner, "model", None) is not None:
        entry["params"] = int(runner.model.count_params())
    if target.variant:
        from .scaling import count_macs
        from .variants import get_variant

        entry["macs"] = count_macs(get_variant(target.variant))
    return entry


def summarize(times_ms: list[float]) -> dict:
    """mean, std (population), min, p50, p90, max in ms."""
    import numpy as np

    a = np.asarray(times_ms, dtype=np.float64)
    return {"mean_ms": float(a.mean()), "std_ms": float(a.std()), "min_ms": float(a.min()),
            "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "max_ms": float(a.max())}


def benchmark(targets: list[Target], options: BenchOptions = BenchOptions(),
              on_round: Callable[[int, int], None] | None = None) -> dict:
    """Time `targets` interleaved and return the record (see module doc).

    `on_round(done, total)` is called once every model has loaded (done=0) and after each round,
    outside the timed calls (for a progress bar). With `options.cpu` the process is pinned while
    timing and given its CPUs back after: a library caller left on one core ran numpy's
    multi-threaded BLAS ~100x slower (its threads took turns on that core).
    """
    before = os.sched_getaffinity(0) if options.cpu is not None and hasattr(os, "sched_getaffinity") else None
    try:
        return _benchmark(targets, options, on_round)
    finally:
        if before is not None:
            set_affinity(before)


def _benchmark(targets: list[Target], options: BenchOptions, on_round) -> dict:
    from . import runtime

    options.validate()
    if options.cpu is not None:
        pin_to_cpu(options.cpu)  # before any backend starts its threads
    record = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "load_avg_before": load_average()}
    import_ms = {}
    for backend in dict.fromkeys(t.backend for t in targets):  # imports (and TF threads) before any model
        start = time.perf_counter_ns()
        runtime.prepare_backend(backend, options.threads)
        import_ms[backend] = _ms(time.perf_counter_ns() - start)

    runners, entries, inputs = [], [], []
    for target in targets:
        rss = _rss_mb()
        start = time.perf_counter_ns()
        runner = _open(target, options.threads)
        startup = _ms(time.perf_counter_ns() - start)
        entry = _describe(target, runner)
        entry["threads"] = options.threads
        entry["import_ms"] = import_ms.pop(target.backend, None)  # given once, on the first model using it
        entry["startup_ms"] = startup
        entry["load_rss_mb"] = None if rss is None else round((_rss_mb() or rss) - rss, 3)
        x = make_input(runner.inputs[0], options.seed)
        start = time.perf_counter_ns()
        runner.run(x)
        entry["first_run_ms"] = _ms(time.perf_counter_ns() - start)
        entry["warmup_ms"], entry["runs_ms"], entry["runs_at_ms"] = [], [], []
        runners.append(runner), entries.append(entry), inputs.append(x)

    rounds = options.warmup + options.runs
    if on_round is not None:
        on_round(0, rounds)
    origin = None
    for i in range(rounds):
        timed = i >= options.warmup
        for runner, entry, x in zip(runners, entries, inputs):
            start = time.perf_counter_ns()
            runner.run(x)
            end = time.perf_counter_ns()
            if not timed:
                entry["warmup_ms"].append(_ms(end - start))
                continue
            origin = start if origin is None else origin
            entry["runs_ms"].append(_ms(end - start))
            entry["runs_at_ms"].append(_ms(start - origin))
        if on_round is not None:
            on_round(i + 1, rounds)

    for entry in entries:
        entry["runs"] = len(entry["runs_ms"])
        entry.update(summarize(entry["runs_ms"]))
        entry["ratio_to_first"] = entry["mean_ms"] / entries[0]["mean_ms"]
    record["settings"] = {"runs": options.runs, "warmup": options.warmup, "threads": options.threads,
                          "cpu": options.cpu, "affinity_cpus": applied_affinity(),
                          "backend_requested": options.backend, "batch": 1, "interleaved": len(entries) > 1,
                          "input": f"uniform random pixels, seed {options.seed}", "timer": "time.perf_counter_ns"}
    record["peak_rss_mb"] = round(peak_rss_mb(), 3)
    record["load_avg_after"] = load_average()
    record["models"] = entries
    return record


# ---------------------------------------------------------------- reporting

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


def write_json(record: dict, path: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


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
