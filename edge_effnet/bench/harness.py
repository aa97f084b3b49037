"""Latency harness: batch-1 timing of exported models (and Keras variants) on a pinned core.

Timing a .tflite file imports only numpy and the interpreter (through runtime.py), so this
runs on a Raspberry Pi with `pip install edge-effnet[runtime]`. Keras variants import
TensorFlow only when one is asked for.

The phases are kept apart, as TFLite's benchmark_model does: backend import, start-up
(load + allocate), first run, warm-up runs, then exactly `runs` timed runs. Several models
are timed interleaved (A B A B ...) so their ratios hold on a noisy machine. Timing
(`benchmark`) returns a plain record; reporting (bench/report.py) only reads it. Every field carries its unit: `_ms`, `_mb`, `_s`.

numpy and the runtime are imported inside functions so the CLI can read BenchOptions' defaults
for --help without them.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Callable

from ..errors import UserError
from ..runtime.backends import BACKENDS, MODEL_EXTENSIONS
from .machine import MB, _rss_mb, applied_affinity, load_average, machine_info, peak_rss_mb, pin_to_cpu, set_affinity

RECORD_FORMAT = "edge-effnet-bench"
RECORD_VERSION = 1



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
        from ..limits import check_all

        check_all(runs=self.runs, warmup=self.warmup, threads=self.threads, cpu=self.cpu)
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


def _expand_folders(items: list[str], backend: str, echo: Callable[[str], None] | None = None
                    ) -> list[tuple[str, str | None]]:
    """(item, backend or None) per model: a folder (an export bundle) stands for its model files of
    one type, those the first installed runtime runs (runtime.backends.choose_files: .tflite in
    ai-edge-litert or tflite-runtime, else .onnx in onnxruntime, ...); `echo` is told which and why."""
    from ..runtime.backends import choose_files

    out = []
    for item in items:
        if not os.path.isdir(item):
            out.append((item, None))
            continue
        files = sorted(f for f in os.listdir(item) if os.path.isfile(os.path.join(item, f)))
        chosen, chosen_backend, note = choose_files(item, files, backend)
        if echo is not None:
            echo(note)
        out += [(os.path.join(item, f), chosen_backend) for f in chosen]
    return out


def resolve_targets(items: list[str], backend: str = "auto", echo: Callable[[str], None] | None = None
                    ) -> list[Target]:
    """Model files, bundle folders or variant names -> targets, checked cheaply (no model is opened
    here). `echo` gets one line per folder: the file(s) it stands for and the runtime."""
    if not items:
        raise UserError("name at least one model file (.tflite, .onnx, .keras) or variant (b0..b7, lite0, ...)")
    from .. import runtime

    targets = []
    for item, chosen in _expand_folders(items, backend, echo):
        ext = os.path.splitext(item)[1].lower()
        if os.path.exists(item) or ext in MODEL_EXTENSIONS or os.sep in item:
            runtime.check_model_file(item)
            targets.append(Target(os.path.basename(item), chosen or runtime.backend_for(item, backend), path=item))
            continue
        from ..model.variants import get_variant

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
    from .. import runtime

    if target.path is not None:
        return runtime.open_model(target.path, target.backend, threads)
    from ..model.keras_io import create_model
    from ..model.variants import get_variant

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
        from ..model.scaling import count_macs
        from ..model.variants import get_variant

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


def benchmark_with_progress(targets: list[Target], options: BenchOptions = BenchOptions()) -> dict:
    """benchmark() with a progress bar on a terminal's stderr (the CLI): the bar starts once every
    model has loaded, so a model that fails to open is still one line."""
    import contextlib

    from ..console import progress

    with contextlib.ExitStack() as stack:
        bars = []

        def on_round(done: int, total: int) -> None:
            if not bars:
                label = f"timing {len(targets)} model(s): {options.warmup} warm-up + {options.runs} timed rounds"
                bars.append(stack.enter_context(progress(None, label, total=total)))
            if bars[0] is not None:  # None: stderr is not a terminal
                bars[0].update(done - bars[0].pos)

        return benchmark(targets, options, on_round=on_round)


def _benchmark(targets: list[Target], options: BenchOptions, on_round) -> dict:
    from .. import runtime

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
