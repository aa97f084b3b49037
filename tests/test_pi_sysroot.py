"""tools/pi_sysroot.py without building anything: its one-line errors."""
import os
import subprocess
import sys

from conftest import ROOT

TOOL = os.path.join(ROOT, "tools", "pi_sysroot.py")


def run_tool(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_missing_host_tools_say_what_to_install(tmp_path):
    # a PATH and search path without debootstrap / qemu: the tool must name the apt packages
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('t', {TOOL!r})\n"
            "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
            f"t.SEARCH_PATH = {str(tmp_path)!r}\n"
            f"sys.exit(t.main(['--cache', {str(tmp_path / 'cache')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "apt-get install debootstrap" in done.stderr
    assert not (tmp_path / "cache").exists()  # nothing half-built


def test_unknown_runtime_is_a_usage_error():
    done = run_tool("run", "--runtime", "tensorflow", "--", "-c", "pass")
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr
