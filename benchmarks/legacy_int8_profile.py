"""Why is full-int8 EfficientNet slow on tflite-runtime 2.14 (x86-64) and fast on ai-edge-litert?

Op-level profile by isolation: each op kind of B0 (with B0's own shapes) is exported alone, fp32
and full-int8, and timed on one pinned core in both runtimes, each with its default delegate
(XNNPACK) and without it (BUILTIN_WITHOUT_DEFAULT_DELEGATES). Whole B0 and Lite0 files are timed
the same way. Writes benchmarks/results/legacy_int8_profile.{md,json} (with the provenance block,
benchmarks/_common.py).

    EDGE_EFFNET_LEGACY_PYTHON=.../bin/python python benchmarks/legacy_int8_profile.py [--lock FILE]

Without $EDGE_EFFNET_LEGACY_PYTHON (a Python with tflite-runtime 2.14, numpy<2) only ai-edge-litert
is timed, and the results say so. Only the timing holds the lock (--lock or $EDGE_EFFNET_BENCH_LOCK).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import _common
import numpy as np

NAME = "legacy_int8_profile"
RUNS = 20

# (name, input shape, layer builder): B0's most expensive instances of each op kind
OPS = [
    ("CONV_2D 1x1 (expand, 56x56 24->144)", (56, 56, 24), lambda L: L.Conv2D(144, 1)),
    ("DEPTHWISE_CONV_2D 3x3 (112x112x96)", (112, 112, 96), lambda L: L.DepthwiseConv2D(3, padding="same")),
    ("LOGISTIC (swish gate, 112x112x96)", (112, 112, 96), lambda L: L.Activation("sigmoid")),
    ("MUL (swish, 112x112x96)", (112, 112, 96), "swish"),
    ("MUL broadcast (SE excite, 112x112x96 * 1x1x96)", (112, 112, 96), "excite"),
    ("MEAN (SE squeeze, 112x112x96)", (112, 112, 96), lambda L: L.GlobalAveragePooling2D(keepdims=True)),
]

TIMER = r'''
import json, os, sys, time
import numpy as np
os.sched_setaffinity(0, {int(sys.argv[1])})
if sys.argv[2] == "litert":
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    import ai_edge_litert as pkg
else:
    from tflite_runtime.interpreter import Interpreter, OpResolverType
    import tflite_runtime as pkg
out = {"version": pkg.__version__, "ms": {}}
for path in sys.argv[4:]:
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        it = Interpreter(model_path=path, num_threads=1,
                         experimental_op_resolver_type=getattr(OpResolverType, resolver))
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.random.default_rng(0).integers(0, 256, d["shape"]).astype(d["dtype"]))
        for _ in range(3):
            it.invoke()
        times = []
        for _ in range(int(sys.argv[3])):
            t = time.perf_counter_ns(); it.invoke(); times.append(time.perf_counter_ns() - t)
        out["ms"][os.path.basename(path) + " " + resolver] = round(float(np.median(times)) / 1e6, 3)
print(json.dumps(out))
'''


def op_model(shape, layer):
    from edge_effnet.console import import_keras

    keras = import_keras()
    L = keras.layers
    x = inputs = L.Input(shape, batch_size=1)
    if layer == "swish":
        x = L.Multiply()([x, L.Activation("sigmoid")(x)])
    elif layer == "excite":
        gate = L.Activation("sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(x))
        x = L.Multiply()([x, gate])
    else:
        x = layer(L)(x)
    return keras.Model(inputs, x)


def export_all(folder: str) -> dict[str, tuple[str, str]]:
    from edge_effnet.console import import_keras
    from edge_effnet.model.keras_io import create_model

    import_keras()
    from edge_effnet.export.fold import fold_input_normalization
    from edge_effnet.export.formats import MODES
    from edge_effnet.export.tflite import convert
    from edge_effnet.model.variants import get_variant

    rng = np.random.default_rng(0)
    files = {}
    models = [(name, op_model(shape, layer), shape) for name, shape, layer in OPS]
    for variant in ("b0", "lite0"):
        spec = get_variant(variant)
        model, _ = fold_input_normalization(create_model(spec, None, batch_size=1))  # as export does
        models.append((f"whole {variant}", model, (spec.resolution, spec.resolution, 3)))
    for i, (name, model, shape) in enumerate(models):
        calib = rng.integers(0, 256, (8, *shape)).astype(np.float32)
        pair = []
        for mode in ("fp32", "int8"):
            path = os.path.join(folder, f"m{i}_{mode}.tflite")
            with open(path, "wb") as f:
                f.write(convert(model, MODES[mode], "int8" if mode == "int8" else "float32", calib))
            pair.append(path)
        files[name] = tuple(pair)
        print(f"exported {name}", file=sys.stderr)
    return files


def time_in(python: str, runtime: str, paths: list[str], cpu: int) -> dict:
    done = subprocess.run([python, "-c", TIMER, str(cpu), runtime, str(RUNS), *paths], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU the timing processes are pinned to")
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for legacy_int8_profile.{md,json}")
    args = parser.parse_args(argv)

    run = _common.start()
    legacy = _common.legacy_python("the tflite-runtime 2.14 columns (the point of this profile)")
    with tempfile.TemporaryDirectory() as folder:
        files = export_all(folder)
        paths = [p for pair in files.values() for p in pair]
        with _common.bench_lock(args.lock):  # only the timing waits for other benchmarks
            runtimes = {"ai-edge-litert": time_in(sys.executable, "litert", paths, args.cpu)}
            if legacy:
                runtimes["tflite-runtime"] = time_in(legacy, "tflite-runtime", paths, args.cpu)
    rows = []
    for name, (fp32, int8) in files.items():
        row = {"op": name}
        for rt, res in runtimes.items():
            for resolver, tag in (("AUTO", "xnnpack"), ("BUILTIN_WITHOUT_DEFAULT_DELEGATES", "builtin")):
                row[f"{rt} {tag} fp32_ms"] = res["ms"][f"{os.path.basename(fp32)} {resolver}"]
                row[f"{rt} {tag} int8_ms"] = res["ms"][f"{os.path.basename(int8)} {resolver}"]
        rows.append(row)
    record = {"runs": RUNS, "threads": 1, "pinned_cpu": args.cpu,
              "runtime_versions": {rt: res["version"] for rt, res in runtimes.items()},
              "legacy_skipped": None if legacy else f"${_common.LEGACY_ENV} not set", "rows": rows}
    cols = [k for k in rows[0] if k != "op"]
    lines = ["# int8 vs fp32 per op kind: ai-edge-litert vs tflite-runtime 2.14 (x86-64, 1 pinned core)", "",
             f"Median of {RUNS} runs, ms. `xnnpack` = the runtime's default (XNNPACK delegate applied where "
             "it takes the ops), `builtin` = BUILTIN_WITHOUT_DEFAULT_DELEGATES. Random weights (timing only). "
             "Runtimes: " + ", ".join(f"{rt} {v}" for rt, v in record["runtime_versions"].items()) + "."
             + ("" if legacy else f" **tflite-runtime 2.14 was not timed** (${_common.LEGACY_ENV} was not set)."),
             "",
             "| op (B0 shapes) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + r["op"] + " | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |" for r in rows]
    _common.write_results(NAME, record, "\n".join(lines) + "\n", run.finish(legacy=legacy), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
