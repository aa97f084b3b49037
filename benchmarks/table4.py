"""The paper's Table 4 on this machine: ResNet-152 vs EfficientNet-B1, and B7; plus B0-B7.

Paper (Tan & Le 2019, Table 4): batch 1, a single core of an Intel Xeon E5-2690, average of
20 runs. ResNet-152 0.554 s vs B1 0.098 s (5.7x); GPipe 19.0 s vs B7 3.1 s (6.1x).

Here: ResNet-152 from keras.applications (random weights: latency does not depend on them)
against B1, both batch 1, timed with `edge-effnet bench` in a fresh process pinned to one CPU
(os.sched_setaffinity) with one thread, interleaved, 20 timed runs:
  - TensorFlow (Keras 3 model under tf.function, 1 intra-op + 1 inter-op thread), like the paper;
  - TFLite float32 and full-integer int8 (uint8 in/out, calibrated on scikit-image photos),
    run by ai-edge-litert with num_threads=1.
GPipe (556M parameters, a pipeline-parallel AmoebaNet) cannot be built here, so B7 is reported
on its own. B0-B7 are timed in TensorFlow (the paper's setting) in one interleaved run; TFLite
float B0-B4 is timed too (B5-B7 only with --tflite-all: their conversions take minutes each).

Conversions use the project's exporter (edge_effnet.export.tflite.convert, frozen graph, batch 1).
Timing runs hold --lock (fcntl) so benchmarks on a shared machine never overlap; conversions
do not. Outputs: benchmarks/results/table4.{md,json,png}.

    python benchmarks/table4.py --lock /work/bench.lock [--cpu 1] [--tflite-all]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edge_effnet.bench import cpu_model, load_average  # noqa: E402  (light: no TensorFlow)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
B_SERIES = [f"b{i}" for i in range(8)]
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]

# Paper Table 4 (seconds) and Table 2 (params, FLOPS = multiply-adds)
PAPER = {
    "setting": "batch 1, single core of Intel Xeon CPU E5-2690, average of 20 runs; framework and threads unstated",
    "resnet152": {"latency_s": 0.554, "top1": 77.8, "params_m": 60, "macs_b": 11},
    "b1": {"latency_s": 0.098, "top1": 78.8, "params_m": 7.8, "macs_b": 0.70},
    "gpipe": {"latency_s": 19.0, "top1": 84.3, "params_m": 556},
    "b7": {"latency_s": 3.1, "top1": 84.4, "params_m": 66, "macs_b": 37},
    "resnet152_over_b1": 5.7,
    "gpipe_over_b7": 6.1,
}


def log(msg: str) -> None:
    print(f"[table4 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models (untimed)

def photos(resolution: int):
    """Real photos from scikit-image, center-cropped to `resolution`, each also mirrored."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from edge_effnet.data import load_image

    folder = os.path.dirname(skimage.data.__file__)
    images = [load_image(os.path.join(folder, p), resolution) for p in PHOTOS
              if os.path.exists(os.path.join(folder, p))]
    images += [np.asarray(Image.fromarray(a).transpose(Image.FLIP_LEFT_RIGHT)) for a in images]
    return np.stack(images)


def keras_macs(model) -> int:
    """Multiply-adds of a Keras model's convolutions and dense layers (batch 1)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            out = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                total += out[1] * out[2] * kh * kw * out[-1]
            else:
                total += out[1] * out[2] * kh * kw * cin * out[-1] // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def build(name: str):
    """A batch-1 Keras model: ResNet-152 (keras.applications, random weights) or a variant."""
    from edge_effnet.models import create_model, import_keras
    from edge_effnet.variants import get_variant

    keras = import_keras()
    if name == "resnet152":
        return keras.applications.ResNet152(weights=None, input_tensor=keras.Input((224, 224, 3), batch_size=1))
    return create_model(get_variant(name), batch_size=1)


def to_tflite(model, path: str, int8: bool, resolution: int) -> None:
    """The project's TFLite export converter (edge_effnet.export.tflite, as `edge-effnet export`):
    float32, or full-integer int8 with uint8 input/output calibrated on real photos."""
    from edge_effnet.export.formats import get_mode
    from edge_effnet.export.tflite import convert
    from edge_effnet.fsutil import atomic_file

    data = convert(model, get_mode("int8"), "uint8", photos(resolution)) if int8 else \
        convert(model, get_mode("fp32"))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def prepare(work: str, tflite_names: list[str]) -> dict:
    """Build and convert everything (skipping files already in `work`); returns model facts."""
    from edge_effnet.scaling import count_macs, count_params
    from edge_effnet.variants import get_variant

    facts = {}
    for name in ["resnet152"] + B_SERIES:
        spec = None if name == "resnet152" else get_variant(name)
        needs = {"keras": name == "resnet152", "fp32": name in tflite_names or name in ("resnet152", "b1"),
                 "int8": name in ("resnet152", "b1")}
        paths = {"keras": os.path.join(work, f"{name}.keras"), "fp32": os.path.join(work, f"{name}_fp32.tflite"),
                 "int8": os.path.join(work, f"{name}_int8.tflite")}
        facts_path = os.path.join(work, f"{name}.facts.json")
        todo = [k for k, on in needs.items() if on and not os.path.exists(paths[k])]
        if todo or not os.path.exists(facts_path):
            log(f"building {name} (batch 1) for {', '.join(todo) or 'facts'}")
            model = build(name)
            f = {"params": int(model.count_params()), "macs": keras_macs(model),
                 "resolution": int(model.inputs[0].shape[1])}
            if spec is not None:
                f.update(params_analytic=count_params(spec), macs_analytic=count_macs(spec))
            with open(facts_path, "w") as fh:
                json.dump(f, fh)
            if "keras" in todo:
                model.save(paths["keras"])
            for kind in ("fp32", "int8"):
                if kind in todo:
                    start = time.perf_counter()
                    to_tflite(model, paths[kind], kind == "int8", f["resolution"])
                    log(f"converted {name} {kind} in {time.perf_counter() - start:.0f} s")
            del model
        with open(facts_path) as fh:
            facts[name] = json.load(fh) | {k: paths[k] for k, on in needs.items() if on}
        for kind in ("fp32", "int8"):
            if kind in facts[name]:
                facts[name][f"{kind}_size_mb"] = round(os.path.getsize(paths[kind]) / 1e6, 3)
    return facts


# ---------------------------------------------------------------- timing (locked, pinned, own process)

@contextlib.contextmanager
def bench_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        start = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 1:
            log(f"waited {waited:.0f} s for {path}")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_bench(models: list[str], args, label: str) -> dict:
    """`edge-effnet bench MODELS --cpu K --threads 1 --runs N --json` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "edge_effnet", "bench", *models, "--cpu", str(args.cpu), "--threads", "1",
               "--runs", str(args.runs), "--warmup", str(args.warmup), "--json", out]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with bench_lock(args.lock):
            log(f"timing {label}: {' '.join(os.path.basename(m) for m in models)}")
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, text=True, capture_output=True)
            log(f"timed {label} in {time.perf_counter() - start:.0f} s")
        if done.returncode != 0:
            sys.exit(f"table4: bench failed for {label}:\n{done.stderr[-2000:]}")
        print(done.stdout, file=sys.stderr)
        with open(out) as fh:
            return json.load(fh)


# ---------------------------------------------------------------- report

def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "ai-edge-litert", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def by_name(record: dict) -> dict:
    return {m["name"]: m for m in record["models"]}


def summarize(facts: dict, records: dict) -> dict:
    tf_pair, lite = by_name(records["pair_tensorflow"]), by_name(records["pair_tflite"])
    rows = []
    for runtime, resnet, b1 in (
            ("TensorFlow (Keras 3, tf.function)", tf_pair["resnet152.keras"], tf_pair["b1"]),
            ("TFLite float32 (ai-edge-litert)", lite["resnet152_fp32.tflite"], lite["b1_fp32.tflite"]),
            ("TFLite int8 (ai-edge-litert)", lite["resnet152_int8.tflite"], lite["b1_int8.tflite"])):
        rows.append({"runtime": runtime, "resnet152_mean_ms": resnet["mean_ms"], "resnet152_std_ms": resnet["std_ms"],
                     "b1_mean_ms": b1["mean_ms"], "b1_std_ms": b1["std_ms"],
                     "resnet152_over_b1": resnet["mean_ms"] / b1["mean_ms"],
                     "resnet152_over_b1_p50": resnet["p50_ms"] / b1["p50_ms"],
                     "paper_resnet152_over_b1": PAPER["resnet152_over_b1"]})
    tf_all = by_name(records["b0_b7_tensorflow"])
    lite_all = by_name(records["b0_b7_tflite"]) if records.get("b0_b7_tflite") else {}
    table = []
    for name in B_SERIES:
        f, t = facts[name], tf_all[name]
        row = {"variant": name, "resolution": f["resolution"], "params": f["params"], "macs": f["macs_analytic"],
               "macs_keras_layers": f["macs"], "tf_mean_ms": t["mean_ms"], "tf_std_ms": t["std_ms"],
               "tf_p50_ms": t["p50_ms"], "tf_over_b0": t["ratio_to_first"]}
        lt = lite_all.get(f"{name}_fp32.tflite")
        row["tflite_fp32_mean_ms"] = lt["mean_ms"] if lt else None
        table.append(row)
    b7, b1 = tf_all["b7"], tf_all["b1"]
    b7_summary = {"tf_mean_ms": b7["mean_ms"], "tf_std_ms": b7["std_ms"],
                  "paper_latency_ms": PAPER["b7"]["latency_s"] * 1e3,
                  "b7_over_b1_measured": b7["mean_ms"] / b1["mean_ms"],
                  "b7_over_b1_paper": PAPER["b7"]["latency_s"] / PAPER["b1"]["latency_s"],
                  "gpipe": "GPipe (AmoebaNet-B, 556M parameters, trained pipeline-parallel) has no public "
                           "Keras/TensorFlow model to build here, so the paper's 19.0 s and 6.1x cannot be "
                           "re-measured"}
    resnet = facts["resnet152"]
    return {"pairs": rows, "b7": b7_summary, "b0_b7": table,
            "resnet152": {"params": resnet["params"], "macs": resnet["macs"],
                          "fp32_size_mb": resnet["fp32_size_mb"], "int8_size_mb": resnet["int8_size_mb"]},
            "b1_sizes_mb": {"fp32": facts["b1"]["fp32_size_mb"], "int8": facts["b1"]["int8_size_mb"]}}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["b0_b7"]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    params = [r["params"] / 1e6 for r in table]
    ax.plot(params, [r["tf_mean_ms"] for r in table], "o-", color="tab:red",
            label="EfficientNet B0-B7, TensorFlow (here)")
    for r, p in zip(table, params):
        ax.annotate(r["variant"].upper(), (p, r["tf_mean_ms"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    lite = [(p, r["tflite_fp32_mean_ms"]) for r, p in zip(table, params) if r["tflite_fp32_mean_ms"]]
    if lite:
        ax.plot(*zip(*lite), "s--", color="tab:orange", label="EfficientNet, TFLite float32 (here)")
    tf_pair = summary["pairs"][0]
    rp = summary["resnet152"]["params"] / 1e6
    ax.plot([rp], [tf_pair["resnet152_mean_ms"]], "D", color="tab:blue", label="ResNet-152, TensorFlow (here)")
    ax.plot([rp], [summary["pairs"][1]["resnet152_mean_ms"]], "D", mfc="none", color="tab:blue",
            label="ResNet-152, TFLite float32 (here)")
    int8 = summary["pairs"][2]
    ax.plot([rp, table[1]["params"] / 1e6], [int8["resnet152_mean_ms"], int8["b1_mean_ms"]], "v", mfc="none",
            color="tab:green",
            label="ResNet-152 and B1, TFLite int8 (here)")
    paper = [(PAPER[k]["params_m"], PAPER[k]["latency_s"] * 1e3, label) for k, label in
             (("b1", "B1"), ("b7", "B7"), ("resnet152", "ResNet-152"), ("gpipe", "GPipe"))]
    ax.plot([p[0] for p in paper], [p[1] for p in paper], "x", color="gray", ms=9, label="paper Table 4 (Xeon E5-2690)")
    for p, ms, label in paper:
        ax.annotate(label, (p, ms), textcoords="offset points", xytext=(5, 4), fontsize=8, color="gray")
    ax.set(xscale="log", yscale="log", xlabel="parameters (millions)", ylabel="latency, batch 1, one core (ms)",
           title="Latency vs parameters (cf. paper Figure 1 / Table 4)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    s, m = result["summary"], result["machine"]
    pairs = s["pairs"]
    out = ["# Table 4 reproduction: ResNet-152 vs EfficientNet-B1 (and B7), batch 1, one core", "",
           f"Date {result['date']}; {m['cpu_model']} ({m['cpu_count']} CPUs, {m['platform']}); timing pinned to "
           f"CPU {result['settings']['cpu']} with one thread; {result['settings']['runs']} timed runs per model after "
           f"{result['settings']['warmup']} warm-up runs, models interleaved (A B A B ...). Versions: "
           + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
           "Load average (1, 5, 15 min) at the start of each timing run: "
           + "; ".join(f"{k} {r['load_avg_before']}" for k, r in result["records"].items() if r) + ". "
           "This machine is shared (2 CPUs, several jobs): absolute times are noisy, ratios from one interleaved "
           "run much less so.", "",
           f"Paper setting: {PAPER['setting']}. ResNet-152 here: keras.applications, random weights "
           f"({s['resnet152']['params']:,} params, {s['resnet152']['macs'] / 1e9:.2f}B MACs; paper 60M, 11B); "
           "EfficientNets from edge_effnet's builder (random weights: latency does not depend on them). "
           "int8 = full-integer quantization, uint8 input/output, calibrated on "
           f"{result['settings']['calibration_images']} scikit-image photos (9 photos and their mirror images).", "",
           "## ResNet-152 vs EfficientNet-B1", "",
           "| runtime | ResNet-152 mean ms (std) | B1 mean ms (std) | ResNet-152 / B1 measured | paper |",
           "|---|---|---|---|---|"]
    for r in pairs:
        out.append(f"| {r['runtime']} | {r['resnet152_mean_ms']:.1f} ({r['resnet152_std_ms']:.1f}) | "
                   f"{r['b1_mean_ms']:.1f} ({r['b1_std_ms']:.1f}) | **{r['resnet152_over_b1']:.1f}x** "
                   f"(p50: {r['resnet152_over_b1_p50']:.1f}x) | 5.7x (554 ms vs 98 ms) |")
    b7 = s["b7"]
    out += ["", "## EfficientNet-B7 (GPipe cannot be built)", "",
            f"{b7['gpipe']}. B7 on its own, TensorFlow, one core, batch 1:", "",
            "| | measured here | paper |", "|---|---|---|",
            f"| B7 latency | {b7['tf_mean_ms'] / 1e3:.2f} s (std {b7['tf_std_ms'] / 1e3:.2f} s) | 3.1 s |",
            f"| B7 / B1 latency | {b7['b7_over_b1_measured']:.1f}x | {b7['b7_over_b1_paper']:.1f}x (3.1 s / 0.098 s) |",
            "| GPipe / B7 | not measurable | 6.1x (19.0 s / 3.1 s) |", "",
            "## B0-B7: parameters, MACs, latency (TensorFlow, one core, batch 1)", "",
            "| variant | res | params | MACs | TF mean ms | TF p50 ms | vs B0 | TFLite fp32 mean ms |",
            "|---|---|---|---|---|---|---|---|"]
    for r in s["b0_b7"]:
        lite = f"{r['tflite_fp32_mean_ms']:.1f}" if r["tflite_fp32_mean_ms"] else "not run (optional: --tflite-all)"
        out.append(f"| {r['variant']} | {r['resolution']} | {r['params']:,} | {r['macs'] / 1e9:.3f}B | "
                   f"{r['tf_mean_ms']:.1f} | {r['tf_p50_ms']:.1f} | {r['tf_over_b0']:.1f}x | {lite} |")
    out += ["", "MACs are the analytic count (convolutions + classifier); a count over the built Keras layers "
            "agrees: " + ", ".join(f"{r['variant']} {r['macs_keras_layers'] / 1e9:.3f}B" for r in s["b0_b7"]) + ".",
            f"TFLite file sizes: ResNet-152 {s['resnet152']['fp32_size_mb']:.1f} MB float / "
            f"{s['resnet152']['int8_size_mb']:.1f} MB int8; B1 {s['b1_sizes_mb']['fp32']:.1f} / "
            f"{s['b1_sizes_mb']['int8']:.1f} MB. Peak RSS of each timing process: "
            + "; ".join(f"{k} {r['peak_rss_mb']:.0f} MB" for k, r in result["records"].items() if r) + ".", "",
            "Why B5-B7 have no TFLite column by default: each conversion takes minutes on this shared machine and "
            "the paper's latency is a TensorFlow one; `--tflite-all` adds them.", "",
            "![latency vs parameters](table4.png)", "",
            "Every run's time is in table4.json (`records`: the `edge-effnet bench --json` records). "
            "Reproduce: `python benchmarks/table4.py --lock /work/bench.lock` (conversions are cached in --workdir)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", type=int, default=allowed[-1], help="CPU to pin the timing processes to")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lock", help="file to flock around timing runs (e.g. /work/bench.lock)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "edge_effnet_table4"),
                   help="where built/converted models are kept between runs")
    p.add_argument("--tflite-all", action="store_true", help="also convert and time B5-B7 in TFLite")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the records kept in --workdir")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    tflite_names = B_SERIES if args.tflite_all else B_SERIES[:5]

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    facts = prepare(args.workdir, tflite_names)
    runs = {"pair_tensorflow": [facts["resnet152"]["keras"], "b1"],
            "pair_tflite": [facts[n][k] for k in ("fp32", "int8") for n in ("resnet152", "b1")],
            "b0_b7_tensorflow": B_SERIES,
            "b0_b7_tflite": [facts[n]["fp32"] for n in tflite_names]}
    records = {}
    for key, models in runs.items():  # each record is kept, so --report-only can redo the report
        saved = os.path.join(args.workdir, f"record_{key}.json")
        if not (args.report_only and os.path.exists(saved)):
            with open(saved, "w") as fh:
                json.dump(run_bench(models, args, key), fh)
        with open(saved) as fh:
            records[key] = json.load(fh)
    started = records["pair_tensorflow"]["date"]
    result = {"date": started, "machine": records["pair_tflite"]["machine"] | {"cpu_model": cpu_model()},
              "versions": versions(), "load_avg_end": load_average(),
              "settings": {"cpu": args.cpu, "runs": args.runs, "warmup": args.warmup, "threads": 1, "batch": 1,
                           "tflite_variants": tflite_names, "calibration_images": len(photos(32))},
              "paper": PAPER, "facts": facts}
    result["summary"] = summarize(facts, records)
    result["records"] = records
    with open(os.path.join(args.out, "table4.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(args.out, "table4.md"), "w") as fh:
        fh.write(markdown(result))
    plot(result["summary"], os.path.join(args.out, "table4.png"))
    log(f"wrote {args.out}/table4.md, table4.json, table4.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
