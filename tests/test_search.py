"""The compound-coefficient grid search: grid, objective, bad input, and a killed search resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli_env, run_cli
from edge_effnet.errors import UserError
from edge_effnet.model.scaling import count_macs
from edge_effnet.train.search import SearchConfig, candidate_spec, grid, plan_candidates, score
from edge_effnet.model.variants import from_phi


def test_grid_holds_the_papers_pick_and_only_constrained_points():
    points = grid(0.05, 0.1)
    assert (1.2, 1.1, 1.15) in points and len(points) == len(set(points)) == 111
    for a, b, g in points:
        assert min(a, b, g) >= 1 and abs(a * b * b * g * g - 2) <= 0.1 + 1e-9
    assert grid(0.4, 0.05) == [(1.0, 1.0, 1.4), (1.0, 1.4, 1.0)]
    assert grid(0.3, 0.001) == []


def test_candidate_is_from_phi_at_the_base_resolution():
    config = SearchConfig(base_resolution=64)
    spec = candidate_spec(1.2, 1.1, 1.15, config)
    ref = from_phi(1, 1.2, 1.1, 1.15, base_resolution=64)
    fields = ("width", "depth", "resolution", "dropout")
    assert [getattr(spec, f) for f in fields] == [getattr(ref, f) for f in fields]
    assert count_macs(spec) == count_macs(ref)


def test_objective_is_the_papers():
    config = SearchConfig()  # T = 400M at 224
    assert score(0.8, 400e6, config) == pytest.approx(0.8)
    assert score(0.8, 800e6, config) == pytest.approx(0.8 * 2 ** -0.07)
    small = SearchConfig(base_resolution=112)
    assert small.normalizer() == pytest.approx(100e6)  # T scales with the pixel count
    assert SearchConfig(target_macs=5e6).normalizer() == 5e6


def test_target_is_a_cap_and_an_unmeetable_one_is_an_error():
    config = SearchConfig(grid_step=0.4, tolerance=0.05, base_resolution=32)
    todo, over = plan_candidates(config, 10)
    assert [c["key"] for c in todo] == ["a1_b1_g1.4", "a1_b1.4_g1"] and not over
    cheap = min(c["macs"] for c in todo)
    todo, over = plan_candidates(SearchConfig(grid_step=0.4, tolerance=0.05, base_resolution=32, target_macs=cheap), 10)
    assert len(todo) == 1 and todo[0]["macs"] == cheap and len(over) == 1
    with pytest.raises(UserError, match="cannot be met"):
        plan_candidates(SearchConfig(grid_step=0.4, tolerance=0.05, base_resolution=32, target_macs=cheap - 1), 10)


@pytest.mark.parametrize("args, message", [
    (["--data", "ONE"], "at least two classes"),
    (["--data", "DIGITS", "--grid-step", "0.3", "--tolerance", "0.001"], "grid is empty"),
    (["--data", "DIGITS", "--base-resolution", "32", "--target-macs", "1e6"], "cannot be met"),
    (["--data", "DIGITS", "--target-ms", "5"], "--objective latency"),
    (["--data", "DIGITS", "--grid-step", "0"], "grid step"),
])
def test_search_bad_input_is_one_line(tmp_path, digits_dir, args, message):
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    (one / "x.png").write_bytes((digits_dir / "0" / os.listdir(digits_dir / "0")[0]).read_bytes())
    args = [{"ONE": tmp_path / "one", "DIGITS": digits_dir}.get(a, a) for a in args]
    r = run_cli("search", *args, "-o", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


SEARCH = ["--family", "lite", "--grid-step", "0.4", "--tolerance", "0.05", "--base-resolution", "32", "--epochs", "1",
          "--batch-size", "16"]


@pytest.mark.slow  # two trained candidates plus a kill: minutes even on a quiet machine
def test_killed_search_resumes_without_retraining(tmp_path, digits_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edge_effnet", "search", "--data", str(digits_dir), *SEARCH, "-o", str(run)]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run / "candidates" / "a1_b1_g1.4.json"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # as a crash or a lost machine: no clean-up
    proc.wait()
    assert first.exists(), proc.stderr.read()
    assert not (run / "results.json").exists()
    done = json.loads(first.read_text())

    again = run_cli("search", "--data", digits_dir, *SEARCH, "-o", run)
    assert again.returncode == 2 and "--resume" in again.stderr
    changed = run_cli("search", "--data", digits_dir, *SEARCH[:-1], "8", "-o", run, "--resume")
    assert changed.returncode == 2 and "train.batch_size" in changed.stderr

    resumed = run_cli("search", "--data", digits_dir, *SEARCH, "-o", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "candidate a1_b1_g1.4" not in resumed.stderr  # not trained again
    assert "candidate a1_b1.4_g1" in resumed.stderr
    assert json.loads(first.read_text()) == done
    report = json.loads((run / "results.json").read_text())
    assert sorted(r["key"] for r in report["ranking"]) == ["a1_b1.4_g1", "a1_b1_g1.4"]
    config = SearchConfig(base_resolution=32, family="lite")
    for r in report["ranking"]:
        analytic = count_macs(candidate_spec(r["alpha"], r["beta"], r["gamma"], config), num_classes=10)
        assert r["macs"] == r["macs_model"] == analytic
        assert 0 <= r["accuracy"] <= 1
        assert r["score"] == pytest.approx(r["accuracy"] * (r["macs"] / report["normalizer"]) ** -0.07)
    assert report["ranking"][0]["score"] >= report["ranking"][1]["score"]
    assert report["step2"].startswith(f"edge-effnet build --phi 1 --alpha {report['best']['alpha']:g}")
    assert "| rank |" in (run / "results.md").read_text() and (run / "accuracy_vs_cost.png").stat().st_size > 1000
    assert "Best: alpha" in resumed.stdout


def test_latency_objective_measures_tflite_and_an_unmeetable_target_is_an_error(tmp_path, digits_dir):
    run = tmp_path / "run"
    r = run_cli("search", "--data", digits_dir, *SEARCH, "--objective", "latency", "--target-ms", "0.001",
                "--max-candidates", "1", "-o", run)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "cannot be met" in lines[-1] and "Traceback" not in r.stderr, r.stderr
    result = json.loads((run / "candidates" / "a1_b1_g1.4.json").read_text())
    assert result["over_target"] and result["accuracy"] is None and result["train_seconds"] == 0  # not trained
    assert result["latency_ms"] > 0.001 and result["latency_runs"] == 20 and result["runtime"]
    assert (run / "candidates" / "a1_b1_g1.4.tflite").stat().st_size == result["tflite_bytes"] > 100_000
    assert not (run / "results.json").exists()
