"""`export --weights auto`: ImageNet when it can be had without asking, else random, said loudly."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from conftest import cli_env


def test_auto_uses_keras_cache_then_falls_back_offline(tmp_path, monkeypatch):
    from edge_effnet.model.variants import get_variant
    from edge_effnet.model.weights import resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("EDGE_EFFNET_OFFLINE", "1")
    weights, record = resolve_weights("auto", get_variant("b0"))
    assert weights == "none" and record["trained"] is False and "offline" in record["source"]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "efficientnetb0.h5").write_bytes(b"stand-in: only its presence is read here")
    weights, record = resolve_weights("auto", get_variant("b0"))
    assert weights == "imagenet" and record["trained"] is True and "keras' cache" in record["source"]
    weights, record = resolve_weights("auto", get_variant("lite3"))  # none published anywhere
    assert weights == "none" and "none are published" in record["source"]
    assert resolve_weights("none", get_variant("b0")) == ("none", {"requested": "none", "trained": False,
                                                                     "source": "random init"})


def test_network_probe_says_offline_for_a_closed_port(monkeypatch):
    from edge_effnet.model import weights

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("EDGE_EFFNET_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "NETWORK_PROBE", ("127.0.0.1", port))
    assert weights.online(timeout=1.0) is False
    with socket.socket() as server:  # and online for one that answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(weights, "NETWORK_PROBE", server.getsockname())
        assert weights.online(timeout=1.0) is True


def test_export_variant_offline_falls_back_loudly(tmp_path):
    """A named variant whose ImageNet file is not cached, offline: a bundle with random weights, one
    loud first line, and a manifest that records what happened."""
    done = subprocess.run([sys.executable, "-m", "edge_effnet", "export", "--variant", "b0", "-o", str(tmp_path / "b0")],
                          capture_output=True, text=True, env=dict(cli_env(), KERAS_HOME=str(tmp_path)), timeout=600)
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("!! WARNING: RANDOM weights") and "offline" in first, first
    manifest = json.loads((tmp_path / "b0" / "manifest.json").read_text())
    assert manifest["weights"]["trained"] is False and manifest["weights"]["requested"] == "auto"
    assert manifest["weights"]["name"] == "none" and any("RANDOM" in w for w in manifest["warnings"])
