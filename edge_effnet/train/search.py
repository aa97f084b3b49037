"""The compound-coefficient grid search (paper step 1): find alpha, beta, gamma at phi = 1.

Candidates are every (alpha, beta, gamma) >= 1 on a grid of step S with
|alpha * beta^2 * gamma^2 - 2| <= tolerance. Each is built at phi = 1 (depth alpha, width beta,
resolution gamma * base resolution), trained with the recipe, evaluated on the held-out split and
scored with the paper's objective ACC * (cost / T)^w, w = -0.07, where the cost is the analytic
multiply-add count ("FLOPS" in the paper) or, device-aware, the measured single-core TFLite
latency. The trials run on KerasTuner (tuning.py), which records, resumes and distributes them.

This module is light (standard library): the CLI validates the grid and the target with it before
TensorFlow is imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..limits import MAX_GRID, check_all
from ..model.scaling import count_macs, flops_factor
from ..model.spec import ModelSpec
from ..model.variants import FAMILIES, dropout_for_phi, make_spec

PAPER_TARGET_MACS = 400e6  # T in the paper (its B0 search), at 224 x 224
PAPER_W = -0.07
OBJECTIVES = ("macs", "latency")


@dataclass(frozen=True)
class SearchConfig:
    grid_step: float = 0.05
    tolerance: float = 0.1  # |alpha * beta^2 * gamma^2 - 2| <= tolerance (paper's pick: 1.92)
    objective: str = "macs"  # macs | latency (single-core TFLite)
    target_macs: float | None = None  # None: 400M scaled by (base resolution / 224)^2; given: also a hard cap
    target_ms: float | None = None  # latency objective: None = 1 ms (scales scores only); given: a hard cap
    base_resolution: int = 224
    family: str = "efficientnet"
    w: float = PAPER_W
    latency_runs: int = 20  # the paper's Table 4 averages 20 runs
    max_candidates: int | None = None  # stop after this many (the grid's order), e.g. a quick first look

    def check(self) -> None:
        check_all(grid_step=self.grid_step, tolerance=self.tolerance, target_macs=self.target_macs,
                  target_ms=self.target_ms, base_resolution=self.base_resolution, latency_runs=self.latency_runs,
                  max_candidates=self.max_candidates)
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r} (choose from {', '.join(OBJECTIVES)})")
        if self.target_ms is not None and self.objective != "latency":
            raise UserError("--target-ms applies to --objective latency")
        if self.family not in FAMILIES:
            raise UserError(f"unknown family {self.family!r} (choose from {', '.join(FAMILIES)})")

    def normalizer(self) -> float:
        """T of the objective (MACs or ms). With a fixed w it rescales every score alike: ranks never change."""
        if self.objective == "latency":
            return self.target_ms or 1.0
        return self.target_macs or PAPER_TARGET_MACS * (self.base_resolution / 224) ** 2


def grid(step: float, tolerance: float, product: float = 2.0) -> list[tuple[float, float, float]]:
    """Every (alpha, beta, gamma) >= 1 on the grid with |alpha * beta^2 * gamma^2 - product| <= tolerance."""
    def axis(limit: float) -> list[float]:
        return [round(1 + i * step, 6) for i in range(int((limit - 1) / step + 1e-9) + 1)]

    top = product + tolerance
    return [(a, b, g) for a in axis(top) for b in axis(math.sqrt(top)) for g in axis(math.sqrt(top))
            if abs(flops_factor(a, b, g) - product) <= tolerance + 1e-9]


def key(alpha: float, beta: float, gamma: float) -> str:
    return f"a{alpha:g}_b{beta:g}_g{gamma:g}"


def candidate_spec(alpha: float, beta: float, gamma: float, config: SearchConfig) -> ModelSpec:
    """The phi = 1 network of (alpha, beta, gamma) (paper eq. 3), as variants.from_phi at this base resolution."""
    return make_spec(f"phi1-{key(alpha, beta, gamma)}", config.family, beta, alpha,
                     int(round(config.base_resolution * gamma)), dropout_for_phi(1), phi=1)


def candidate_row(alpha: float, beta: float, gamma: float, config: SearchConfig, num_classes: int | None) -> dict:
    """A candidate's planned row: its coefficients, scaled spec and analytic MACs (None without a class count)."""
    spec = candidate_spec(alpha, beta, gamma, config)
    return dict(key=key(alpha, beta, gamma), alpha=alpha, beta=beta, gamma=gamma,
                flops_factor=round(flops_factor(alpha, beta, gamma), 6), width=spec.width, depth=spec.depth,
                resolution=spec.resolution,
                macs=None if num_classes is None else count_macs(spec, num_classes=num_classes))


def score(accuracy: float, cost: float, config: SearchConfig) -> float:
    """The paper's objective ACC * (cost / T)^w."""
    return accuracy * (cost / config.normalizer()) ** config.w


def plan_candidates(config: SearchConfig, num_classes: int) -> tuple[list[dict], list[dict]]:
    """(candidates to train, candidates over the MAC target) with their analytic MACs; UserError if none."""
    config.check()
    points = grid(config.grid_step, config.tolerance)
    if not points:
        raise UserError(f"the grid is empty: no (alpha, beta, gamma) >= 1 with step {config.grid_step:g} has "
                        f"alpha*beta^2*gamma^2 within {config.tolerance:g} of 2; widen --tolerance or use a finer "
                        "--grid-step")
    if len(points) > MAX_GRID and config.max_candidates is None:
        raise UserError(f"the grid has {len(points):,} candidates, more than the {MAX_GRID} a search may plan "
                        "(each is a training run); use a coarser --grid-step, a smaller --tolerance or "
                        "--max-candidates")
    rows = [candidate_row(a, b, g, config, num_classes) for a, b, g in points]
    over = [r for r in rows if config.target_macs is not None and r["macs"] > config.target_macs]
    keep = [r for r in rows if r not in over]
    if not keep:
        smallest = min(rows, key=lambda r: r["macs"])
        raise UserError(f"the target of {config.target_macs:,.0f} MACs cannot be met: the smallest of the "
                        f"{len(rows)} candidates ({smallest['key']}) needs {smallest['macs']:,} at base resolution "
                        f"{config.base_resolution}; raise --target-macs or lower --base-resolution")
    if config.max_candidates is not None:
        keep = keep[:config.max_candidates]
    return keep, over


def check_run_dir(run_dir: str, resume: bool) -> None:
    """Cheap checks of RUN_DIR before any work: new or empty, or (--resume) a search of ours."""
    import os

    if resume:
        if not os.path.isfile(os.path.join(run_dir, "search.json")):
            raise UserError(f"nothing to resume: {run_dir} holds no search (search.json)")
        return
    if os.path.exists(run_dir):
        if not os.path.isdir(run_dir) or os.listdir(run_dir):
            raise UserError(f"{run_dir} exists; pass --resume to continue its search or choose a new folder")
        return
    from ..fsutil import check_output

    check_output(run_dir, False, "search")  # its folder exists and is writable


def rank(results: list[dict]) -> list[dict]:
    """Finished candidates, best score first; candidates over a target (score 0) last."""
    return sorted(results, key=lambda r: (-r["score"], r["key"]))


def step2_command(best: dict, config: SearchConfig, num_classes: int) -> str:
    res = "" if config.base_resolution == 224 else f" --resolution {best['resolution']}"
    family = "" if config.family == "efficientnet" else f" --family {config.family}"
    return (f"edge-effnet build --phi 1 --alpha {best['alpha']:g} --beta {best['beta']:g} --gamma {best['gamma']:g}"
            f"{family}{res} --num-classes {num_classes} -o scaled.keras")


def report_markdown(report: dict) -> str:
    s = report["settings"]
    cost = "latency_ms" if s["objective"] == "latency" else "macs"
    lines = [
        f"# Compound-coefficient search: {report['data']}",
        "",
        f"phi = 1, grid step {s['grid_step']:g}, |alpha*beta^2*gamma^2 - 2| <= {s['tolerance']:g}, "
        f"objective ACC * ({cost} / T)^{s['w']:g} with T = {report['normalizer']:g}"
        f"{' ms' if cost == 'latency_ms' else ' MACs'}; base resolution {s['base_resolution']}, family "
        f"{s['family']}, {report['train']['epochs']} epoch(s) per candidate, {report['num_classes']} classes.",
        "",
        "| rank | alpha | beta | gamma | a*b^2*g^2 | res | MACs | latency ms | params | accuracy | score | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["ranking"], 1):
        lat = f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else "-"
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "over target"
        lines.append(f"| {i} | {r['alpha']:g} | {r['beta']:g} | {r['gamma']:g} | {r['flops_factor']:.3f} | "
                     f"{r['resolution']} | {r['macs']:,} | {lat} | {r['params']:,} | {acc} | {r['score']:.4f} | "
                     f"{r['train_seconds']:.0f} |")
    if report["over_target"]:
        lines += ["", f"Not trained, over the MAC target: {', '.join(r['key'] for r in report['over_target'])}."]
    if report["ranking"]:
        lines += ["", f"Best: alpha {report['best']['alpha']:g}, beta {report['best']['beta']:g}, "
                      f"gamma {report['best']['gamma']:g}. Step 2 (scale up; raise --phi):", "",
                  f"    {report['step2']}", ""]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> bool:
    """Accuracy against cost, one labelled point per candidate; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    latency = report["settings"]["objective"] == "latency"
    rows = [r for r in report["ranking"] if r.get("accuracy") is not None]
    xs = [r["latency_ms"] if latency else r["macs"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs, [r["accuracy"] for r in rows], c=[r["score"] for r in rows], cmap="viridis")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['alpha']:g}/{r['beta']:g}/{r['gamma']:g}", (x, r["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if rows:
        best = report["best"]
        ax.scatter([best["latency_ms"] if latency else best["macs"] / 1e6], [best["accuracy"]], s=160,
                   facecolors="none", edgecolors="red", label="best score")
        ax.legend(loc="lower right")
    ax.set_xlabel("single-core TFLite latency (ms)" if latency else "MACs (millions)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("phi = 1 candidates (labels: alpha/beta/gamma)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..fsutil import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True
