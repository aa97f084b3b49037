"""The paper's Table 4 on this machine: ResNet-152 vs EfficientNet-B1, and B7; plus B0-B7.

Paper (Tan & Le 2019, Table 4): batch 1, a single core of an Intel Xeon E5-2690, average of
20 runs. ResNet-152 0.554 s vs B1 0.098 s (5.7x); GPipe 19.0 s vs B7 3.1 s (6.1x).

Here: ResNet-152 from keras.applications (random weights: latency does not depend on them)
against B1, both batch 1, timed with `edge-effnet bench` in a fresh process pinned to one CPU
(os.sched_setaffinity) with one thread, interleaved, 20 timed runs:
  - TensorFlow (Keras 3 model under tf.function, 1 intra-op + 1 inter-op thread), like the paper;
  - TFLite float32 and full-integer int8 (uint8 in/out, calibrated on 100 crops of scikit-image's
    photos), run by ai-edge-litert with num_threads=1.
GPipe (556M parameters, a pipeline-parallel AmoebaNet) cannot be built here, so B7 is reported
on its own. B0-B7 are timed in TensorFlow (the paper's setting) in one interleaved run; TFLite
float B0-B4 is timed too (B5-B7 only with --tflite-all: their conversions take minutes each).

Every .tflite file is made by the path `edge-effnet export --format tflite` takes (edge_effnet.export.api
.export: batch 1, input normalization folded into the stem, GPTQ-rounded int8 weights, measured activation
ranges, self-checked): what a user gets. Conversions are cached in --workdir under a key of the
code's content (every file of edge_effnet/), the tool versions, the export options and the inputs'
content, so a cached file is reused only when a fresh conversion would make the same file.
Timing runs hold --lock (or $EDGE_EFFNET_BENCH_LOCK) so benchmarks on a shared machine never
overlap; conversions do not. Outputs: benchmarks/results/table4.{md,json,png} (with the provenance
block, benchmarks/_common.py).

    python benchmarks/table4.py [--lock FILE] [--cpu 1] [--tflite-all]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import _common

ROOT = _common.ROOT
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NAME = "table4"
B_SERIES = [f"b{i}" for i in range(8)]
NUM_CALIB = 100  # as `edge-effnet export` (export.api.NUM_CALIB)

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
    _common.log(NAME, msg)


# ---------------------------------------------------------------- models (untimed)

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    from edge_effnet.console import import_keras
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import get_variant

    keras = import_keras()
    keras.utils.set_random_seed(0)  # the same random weights every run (a cached .keras is then the same file)
    if name == "resnet152":
        return keras.applications.ResNet152(weights=None, input_tensor=keras.Input((224, 224, 3), batch_size=1))
    return create_model(get_variant(name), batch_size=1)


def export_tflite(name: str, kind: str, work: str, calib: str, code: str, keras_path: str | None = None
                  ) -> tuple[str, dict]:
    """`edge-effnet export --format tflite --KIND --calib CALIB` of variant `name` (or of the .keras file
    `keras_path`): the .tflite path and facts about the conversion. Cached in `work` under a key of the code's
    content, the tool versions, the options and the content of the calibration images and the model file."""
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.export.bundle import MANIFEST
    from edge_effnet.model.variants import get_variant

    options = ExportOptions(spec=None if keras_path else get_variant(name), model_path=keras_path,
                            weights="none" if keras_path is None else None,  # random: latency does not depend on them
                            mode=kind, formats=("tflite",), calib=calib, num_calib=NUM_CALIB)
    if "accept_low_fidelity" in {f.name for f in dataclasses.fields(ExportOptions)}:
        # random weights: the table times files, a fidelity floor on a random model's scores says nothing
        options = dataclasses.replace(options, accept_low_fidelity=True)
    key = digest({"code": code, "versions": _common.versions(), "calib": file_digest(calib),
                  "model": file_digest(keras_path) if keras_path else name,
                  "options": dataclasses.asdict(dataclasses.replace(options, model_path=None, calib=None))})
    out = os.path.join(work, f"{name}_{kind}-{key}")
    cached = os.path.exists(os.path.join(out, MANIFEST))
    if cached:
        with open(os.path.join(out, MANIFEST)) as fh:
            manifest = json.load(fh)
        log(f"{name} {kind}: cached conversion {os.path.basename(out)} (same code, options and inputs)")
    else:
        start = time.perf_counter()
        manifest = export(dataclasses.replace(options, output=out), echo=lambda line: log(f"{name} {kind}: {line}")
                          ).manifest
        log(f"exported {name} {kind} in {time.perf_counter() - start:.0f} s")
    rec = manifest["files"][0]
    calibration = manifest.get("calibration") or {}
    if calibration.get("source"):
        calibration = {**calibration, "source": os.path.basename(calibration["source"])}  # no machine path
    return os.path.join(out, rec["file"]), {
        "cache_key": key, "cached": cached, "export_seconds": rec["export_seconds"], "io": rec["io"],
        "weight_correction": rec.get("weight_correction"), "graph_rewrites": manifest.get("graph_rewrites"),
        "calibration": calibration, "selfcheck_cosine_mean": rec["selfcheck"].get("cosine_mean")}


def prepare(work: str, tflite_names: list[str]) -> dict:
    """Build and export everything (reusing what `work` holds under the same key); returns model facts."""
    from edge_effnet.model.scaling import count_macs, count_params
    from edge_effnet.model.variants import get_variant

    code = _common.code_version()
    facts, calib = {}, {}
    for name in ["resnet152"] + B_SERIES:
        spec = None if name == "resnet152" else get_variant(name)
        kinds = [k for k, on in (("fp32", name in tflite_names or name in ("resnet152", "b1")),
                                 ("int8", name in ("resnet152", "b1"))) if on]
        folder = os.path.join(work, f"{name}-{digest({'code': code, 'versions': _common.versions()})}")
        os.makedirs(folder, exist_ok=True)
        facts_path, keras_path = os.path.join(folder, "facts.json"), os.path.join(folder, f"{name}.keras")
        needs_keras = name == "resnet152" and not os.path.exists(keras_path)
        if needs_keras or not os.path.exists(facts_path):
            log(f"building {name} (batch 1) for its facts" + (" and its .keras file" if needs_keras else ""))
            model = build(name)
            f = {"params": int(model.count_params()), "macs": keras_macs(model),
                 "resolution": int(model.inputs[0].shape[1])}
            if spec is not None:
                f.update(params_analytic=count_params(spec), macs_analytic=count_macs(spec))
            if needs_keras:
                from edge_effnet.fsutil import atomic_file

                with atomic_file(keras_path) as tmp:
                    model.save(tmp)
            from edge_effnet.fsutil import write_json

            write_json(facts_path, f)
            del model
        with open(facts_path) as fh:
            facts[name] = json.load(fh)
        if name == "resnet152":
            facts[name]["keras"] = keras_path
        resolution = facts[name]["resolution"]
        if resolution not in calib:  # written afresh each run; the cache keys hold its content
            calib[resolution] = _common.save_calibration(work, NUM_CALIB, resolution, f"calib-{resolution}.npy")
        for kind in kinds:
            path, conversion = export_tflite(name, kind, work, calib[resolution], code,
                                             keras_path if name == "resnet152" else None)
            facts[name][kind] = path
            facts[name][f"{kind}_size_mb"] = round(os.path.getsize(path) / 1e6, 3)
            facts[name][f"{kind}_conversion"] = conversion
    return facts


def portable_facts(facts: dict) -> dict:
    """`facts` with file names instead of paths (results files carry no machine paths)."""
    return {name: {k: os.path.basename(v) if k in ("keras", "fp32", "int8") else v for k, v in f.items()}
            for name, f in facts.items()}


def portable_record(record: dict) -> dict:
    """A bench record with file names instead of paths."""
    out = dict(record)
    out["models"] = [{**m, "path": os.path.basename(m["path"])} if m.get("path") else m for m in record["models"]]
    return out


# ---------------------------------------------------------------- timing (locked, pinned, own process)

def run_bench(models: list[str], args, label: str) -> dict:
    """`edge-effnet bench MODELS --cpu K --threads 1 --runs N --json` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "edge_effnet", "bench", *models, "--cpu", str(args.cpu), "--threads", "1",
               "--runs", str(args.runs), "--warmup", str(args.warmup), "--json", out]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with _common.bench_lock(args.lock):
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
    s = result["summary"]
    pairs = s["pairs"]
    out = ["# Table 4 reproduction: ResNet-152 vs EfficientNet-B1 (and B7), batch 1, one core", "",
           f"Timing pinned to CPU {result['settings']['cpu']} with one thread; {result['settings']['runs']} timed "
           f"runs per model after {result['settings']['warmup']} warm-up runs, models interleaved (A B A B ...).",
           "Load average (1, 5, 15 min) at the start of each timing run: "
           + "; ".join(f"{k} {r['load_avg_before']}" for k, r in result["records"].items() if r) + ". "
           "This machine is shared (2 CPUs, several jobs): absolute times are noisy, ratios from one interleaved "
           "run much less so.", "",
           f"Paper setting: {PAPER['setting']}. ResNet-152 here: keras.applications, random weights "
           f"({s['resnet152']['params']:,} params, {s['resnet152']['macs'] / 1e9:.2f}B MACs; paper 60M, 11B); "
           "EfficientNets from edge_effnet's builder (random weights: latency does not depend on them). "
           "TFLite files are made by `edge-effnet export` (export.api.export: stem normalization folded, GPTQ int8 "
           "weights, measured activation ranges, self-checked), as a user gets them. "
           "int8 = full-integer quantization, uint8 input/output, calibrated on "
           f"{_common.photo_note(result['settings']['calibration_images'])}.", "",
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
            "Reproduce: `python benchmarks/table4.py [--lock FILE]` (conversions are cached in --workdir under a "
            "key of the code's content, the tool versions, the export options and the inputs' content)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", type=int, default=allowed[-1], help="CPU to pin the timing processes to")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    _common.add_lock_argument(p)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "edge_effnet_table4"),
                   help="where built/exported models are kept between runs (keyed by code, options and inputs)")
    p.add_argument("--tflite-all", action="store_true", help="also convert and time B5-B7 in TFLite")
    p.add_argument("--report-only", action="store_true", help="rewrite table4.md and table4.png from table4.json")
    p.add_argument("--out", default=_common.RESULTS)
    args = p.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, f"{NAME}.json")) as fh:
            saved = json.load(fh)
        _common.write_markdown(NAME, markdown(saved), saved.get("provenance"), args.out)
        plot(saved["summary"], os.path.join(args.out, "table4.png"))
        return
    os.makedirs(args.workdir, exist_ok=True)
    tflite_names = B_SERIES if args.tflite_all else B_SERIES[:5]

    run = _common.start()
    facts = prepare(args.workdir, tflite_names)
    runs = {"pair_tensorflow": [facts["resnet152"]["keras"], "b1"],
            "pair_tflite": [facts[n][k] for k in ("fp32", "int8") for n in ("resnet152", "b1")],
            "b0_b7_tensorflow": B_SERIES,
            "b0_b7_tflite": [facts[n]["fp32"] for n in tflite_names]}
    records = {key: portable_record(run_bench(models, args, key)) for key, models in runs.items()}
    result = {"settings": {"cpu": args.cpu, "runs": args.runs, "warmup": args.warmup, "threads": 1, "batch": 1,
                           "tflite_variants": tflite_names, "calibration_images": NUM_CALIB,
                           "conversion": "edge_effnet.export.api.export (as `edge-effnet export --format tflite`)"},
              "paper": PAPER, "facts": portable_facts(facts)}
    result["summary"] = summarize(facts, records)
    result["records"] = records
    _common.write_results(NAME, result, markdown(result), run.finish(), args.out)
    plot(result["summary"], os.path.join(args.out, "table4.png"))
    log(f"wrote {os.path.join(args.out, 'table4')}.md, .json, .png")
    print(markdown(result))


if __name__ == "__main__":
    main()
