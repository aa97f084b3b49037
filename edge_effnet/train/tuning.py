"""The search's trials on KerasTuner: it records, resumes and distributes them; we train and score.

- CompoundGridOracle enumerates the constrained grid (search.plan_candidates) in order; KerasTuner
  saves every trial under RUN_DIR/tuner and, on a restart, keeps the finished ones and re-runs the
  one that was cut off.
- CompoundTuner.run_trial builds the phi = 1 model, checks its MACs against the analytic count,
  trains it with the recipe (under the tf.distribute strategy of the train config), measures
  single-core TFLite latency when asked, scores it and writes RUN_DIR/candidates/KEY.json at once.
- Chief/worker mode is KerasTuner's own: with KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and
  KERASTUNER_ORACLE_PORT set, the chief (tuner id "chief") serves the oracle and writes the report,
  every worker pulls candidates from it.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from ..errors import CheckFailed, UserError
from ..console import import_keras
from ..fsutil import atomic_file, write_json, write_text
from .search import (SearchConfig, candidate_row, check_run_dir, candidate_spec, key, plan_candidates, plot, rank,
                     report_markdown, score, step2_command)

keras = import_keras()
import keras_tuner as kt  # noqa: E402

from . import train as training  # noqa: E402
from ..data import labeled_images  # noqa: E402
from ..model.keras_io import count_model_macs  # noqa: E402
from ..model.scaling import count_params  # noqa: E402

HP_NAMES = ("alpha", "beta", "gamma")


class CompoundGridOracle(kt.Oracle):
    """Hands out the planned (alpha, beta, gamma) candidates in order, each once."""

    def __init__(self, candidates: list[dict], **kwargs):
        super().__init__(objective=kt.Objective("score", "max"), max_trials=len(candidates),
                         max_consecutive_failed_trials=len(candidates), **kwargs)
        self.candidates = [tuple(c[n] for n in HP_NAMES) for c in candidates]
        for i, name in enumerate(HP_NAMES):
            self.hyperparameters.Choice(name, sorted({c[i] for c in self.candidates}))

    def populate_space(self, trial_id):
        for values in self.candidates:
            values = dict(zip(HP_NAMES, values))
            if not self._duplicate(values):
                return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": values}
        return {"status": kt.engine.trial.TrialStatus.STOPPED}


def tflite_latency_ms(model, path: str, runs: int = 20) -> dict:
    """Float TFLite export of a batch-1 model (export.tflite), timed by the bench harness: one pinned
    core, one thread, `runs` timed runs, as Table 4."""
    from ..bench.harness import BenchOptions, benchmark, resolve_targets
    from ..export.formats import MODES
    from ..export.tflite import convert

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(convert(model, MODES["fp32"]))
    options = BenchOptions(runs=runs, warmup=3, threads=1, cpu=min(os.sched_getaffinity(0)))
    entry = benchmark(resolve_targets([path]), options)["models"][0]
    return dict(latency_ms=entry["mean_ms"], latency_p50_ms=entry["p50_ms"], latency_runs=runs,
                tflite_bytes=os.path.getsize(path), runtime=f"{entry['backend']} {entry['backend_version']}")


class CompoundTuner(kt.engine.base_tuner.BaseTuner):
    """Runs one candidate per trial; the result file in RUN_DIR/candidates is written as it finishes."""

    def __init__(self, oracle, run_dir: str, data_dir: str, config: SearchConfig, train_config, verbose: int):
        super().__init__(oracle, directory=run_dir, project_name="tuner")
        self.run_dir, self.data_dir, self.config, self.train_config = run_dir, data_dir, config, train_config
        self.verbose = verbose
        self._images: dict[int, tuple] = {}

    def images(self, resolution: int):
        if resolution not in self._images:
            self._images[resolution] = labeled_images(self.data_dir, resolution)
        return self._images[resolution]

    def run_trial(self, trial, *args, **kwargs):
        values = {n: trial.hyperparameters.get(n) for n in HP_NAMES}
        name = key(*values.values())
        result_file = os.path.join(self.run_dir, "candidates", f"{name}.json")
        if os.path.isfile(result_file):  # finished, but the search was cut off before KerasTuner recorded it
            with open(result_file) as f:
                return metrics_of(json.load(f))
        try:
            result = self.evaluate_candidate(values, name)
        except UserError as exc:  # a failed MAC check or bad data: stop the search, do not skip the candidate
            raise kt.errors.FatalError(f"{type(exc).__name__}: {exc}") from None
        write_json(result_file, result)
        if self.verbose:
            acc = "over target" if result["accuracy"] is None else f"accuracy {result['accuracy']:.4f}"
            print(f"candidate {name}: {acc}, MACs {result['macs']:,}, score {result['score']:.4f}, "
                  f"{result['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        return metrics_of(result)

    def evaluate_candidate(self, values: dict, name: str) -> dict:
        config, train_config = self.config, self.train_config
        spec = candidate_spec(values["alpha"], values["beta"], values["gamma"], config)
        pixels, labels, class_names = self.images(spec.resolution)
        num_classes = len(class_names)
        row = dict(candidate_row(*values.values(), config, num_classes),
                   params=count_params(spec, num_classes=num_classes), latency_ms=None, accuracy=None,
                   train_seconds=0.0)
        macs = row["macs"]
        if config.objective == "latency":  # measured first: a candidate over --target-ms is not trained
            row.update(tflite_latency_ms(training.build_classifier(spec, num_classes, batch_size=1),
                                         os.path.join(self.run_dir, "candidates", f"{name}.tflite"),
                                         config.latency_runs))
            if config.target_ms is not None and row["latency_ms"] > config.target_ms:
                return dict(row, score=0.0, over_target=True)
        trained = training.train_arrays(spec, pixels, labels, class_names, train_config, verbose=0)
        row["macs_model"] = count_model_macs(trained.model)
        if row["macs_model"] != macs:
            raise CheckFailed(f"{name}: the built model has {row['macs_model']:,} MACs, the analytic count "
                              f"{macs:,}")
        if trained.model.count_params() != row["params"]:
            raise CheckFailed(f"{name}: the built model has {trained.model.count_params():,} parameters, "
                              f"the analytic count {row['params']:,}")
        cost = row["latency_ms"] if config.objective == "latency" else macs
        return dict(row, accuracy=trained.val_accuracy, val_loss=trained.val_loss, score=score(
            trained.val_accuracy, cost, config), over_target=False, train_seconds=round(trained.seconds, 2),
            num_train=trained.num_train, num_val=trained.num_val, history=trained.history)

    def save_model(self, trial_id, model, step=0):
        pass  # candidates are compared, not kept: the winner is rebuilt and scaled in step 2


METRICS = ("score", "accuracy", "macs", "macs_model", "params", "latency_ms", "train_seconds")


def metrics_of(result: dict) -> dict:
    """The numbers KerasTuner records for a trial (it stores only numbers; None is left out)."""
    return {k: float(result[k]) for k in METRICS if result.get(k) is not None}


def _result_of(trial, run_dir: str, config: SearchConfig) -> dict:
    """A finished trial as a result row: its file when this host has it, else the oracle's numbers
    (a chief in chief/worker mode: the workers keep the files)."""
    values = {n: trial.hyperparameters.get(n) for n in HP_NAMES}
    path = os.path.join(run_dir, "candidates", f"{key(*values.values())}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    row = candidate_row(*values.values(), config, None)
    for name in METRICS:
        row[name] = trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None
    for name in ("macs", "macs_model", "params"):
        row[name] = int(row[name]) if row[name] is not None else None
    row["over_target"] = row["accuracy"] is None
    return row


def run_trials(data_dir: str, run_dir: str, candidates: list[dict], config: SearchConfig, train_config,
               verbose: int = 1) -> list[dict] | None:
    """Run (or resume) every candidate; their results, or None on a chief/worker-mode worker."""
    oracle = CompoundGridOracle(candidates)
    oracle.verbose = 0  # our one line per candidate replaces KerasTuner's trial tables
    try:
        tuner = CompoundTuner(oracle, run_dir, data_dir, config, train_config, verbose)
    except RuntimeError as exc:
        raise UserError(f"cannot reload the search in {run_dir}: {str(exc).splitlines()[0]}") from None
    try:
        tuner.search()
    except kt.errors.FatalError as exc:
        kind, _, message = str(exc).partition(": ")
        raise (CheckFailed if kind == "CheckFailed" else UserError)(message) from None
    except RuntimeError as exc:  # KerasTuner gives up after consecutive failed trials
        raise UserError(f"the search stopped: {str(exc).splitlines()[0]}") from None
    from keras_tuner.src.distribute import utils as dist_utils

    if dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle():
        return None
    finished = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    failed = [t for t in tuner.oracle.trials.values() if t.status == "FAILED"]
    if failed and not finished:
        raise UserError(f"every candidate failed; the first: {(failed[0].message or '').strip().splitlines()[-1]}")
    if failed:
        print(f"warning: {len(failed)} candidate(s) failed; see {run_dir}/tuner/trial_*/trial.json",
              file=sys.stderr)
    return [_result_of(t, run_dir, config) for t in finished]


def settings_record(data_dir: str, config: SearchConfig, train_config) -> dict:
    return json.loads(json.dumps(dict(data=os.path.abspath(data_dir), search=asdict(config),
                                      train=asdict(train_config))))


def open_run_dir(run_dir: str, settings: dict, resume: bool) -> None:
    """Start RUN_DIR (must be new or empty) or check that --resume uses the settings it was started with."""
    settings_file = os.path.join(run_dir, "search.json")
    if resume:
        if not os.path.isfile(settings_file):
            raise UserError(f"nothing to resume: {run_dir} holds no search (search.json)")
        with open(settings_file) as f:
            saved = json.load(f)
        changed = [f"{part}.{k}" for part in ("search", "train") for k in saved[part]
                   if saved[part][k] != settings[part].get(k)]
        if saved["data"] != settings["data"]:
            changed.insert(0, "data")
        if changed:
            raise UserError(f"--resume with settings that differ from the run's: {', '.join(changed)}")
        return
    check_run_dir(run_dir, resume)
    try:
        os.makedirs(os.path.join(run_dir, "candidates"), exist_ok=True)
    except OSError as exc:
        from ..fsutil import os_error

        raise os_error(run_dir, exc) from None
    write_json(settings_file, settings)


def run_search(data_dir: str, run_dir: str, config: SearchConfig = SearchConfig(), train_config=None,
               resume: bool = False, verbose: int = 1) -> dict | None:
    """`edge-effnet search`: plan, train every candidate on KerasTuner, rank, write the report.

    Returns the report, or None on a KerasTuner worker (the chief writes the report).
    """
    from ..data import class_folders
    from .recipe import TrainConfig

    train_config = train_config or TrainConfig(epochs=3)
    train_config.check()
    num_classes = len(class_folders(data_dir))
    todo, over = plan_candidates(config, num_classes)
    settings = settings_record(data_dir, config, train_config)
    open_run_dir(run_dir, settings, resume)
    results = run_trials(data_dir, run_dir, todo, config, train_config, verbose=verbose)
    if results is None:  # a worker in KerasTuner's chief/worker mode
        return None
    if results and all(r.get("over_target") for r in results):
        fastest = min(results, key=lambda r: r["latency_ms"])
        raise UserError(f"the latency target of {config.target_ms:g} ms cannot be met: the fastest of "
                        f"{len(results)} candidate(s) ({fastest['key']}) takes {fastest['latency_ms']:.2f} ms on one "
                        "core; raise --target-ms or lower --base-resolution")
    ranking = rank(results)
    report = dict(data=os.path.abspath(data_dir), num_classes=num_classes, settings=settings["search"],
                  train=settings["train"], normalizer=config.normalizer(), candidates_planned=len(todo),
                  ranking=ranking, over_target=over, best=ranking[0] if ranking else None,
                  step2=step2_command(ranking[0], config, num_classes) if ranking else None)
    write_json(os.path.join(run_dir, "results.json"), report)
    write_text(os.path.join(run_dir, "results.md"), report_markdown(report))
    report["plot"] = plot(report, os.path.join(run_dir, "accuracy_vs_cost.png"))
    return report
