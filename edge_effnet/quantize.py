"""Make a float Keras model quantize better: int8 weight rounding (GPTQ) and bias correction.

Full-integer TFLite stores each conv / depthwise / dense kernel as int8 with one scale per output
channel (BatchNorm folded in first): scale = max|w| / 127, every weight rounded to the nearest
step. Two things make the int8 file follow the float model more closely, both computed here on
the calibration images and written back into a float copy of the model, which then converts with
any TFLite mode:

- GPTQ rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers"): per layer, the kernel's columns are rounded one at a time (largest
  input energy first) and the rounding error of each is pushed onto the columns not yet rounded,
  weighted by the inverse of the input Gram matrix H = E[x x^T] (x: the kernel's input patches),
  so the layer's output on real inputs moves less than with nearest rounding. The copy's kernels
  are already on the converter's int8 grid (each channel keeps a weight at +-127 steps, so the
  converter computes the same scale and rounds nothing).
- Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
  Bias Correction"): what is left of the rounding error still shifts each output channel's mean
  by E[x] . (w_int8 - w); the BatchNorm beta (or the layer's own bias) is moved by minus that.

Both need only one forward pass of the float model over the calibration images (the input means
and H of every kernel); the copy computes almost the same function as the float model. Cost: on
2 cores, about 25 s for Lite0 and 60 s for B1 with 100 images (the converter's own calibration of
B1 takes another 25 s); `bias` alone costs a few seconds.
"""
from __future__ import annotations

import numpy as np

LEVELS = 127  # symmetric int8 weights: [-127, 127] * scale
# name -> what export does to int8 weights before converting (--weight-correction)
CORRECTIONS = {
    "gptq": "GPTQ rounding, then bias correction",
    "bias": "nearest rounding (as the converter rounds), then bias correction",
    "none": "the converter's own nearest rounding only",
}
GPTQ_DAMPING = 0.01   # added to H's diagonal, times its mean: H from a few images can be singular
HESSIAN_ROWS = 4096   # input patches per image sampled for H (the means use every position)
GPTQ_BLOCK = 128      # columns rounded together before the rest of the kernel is updated


def int8_targets(model) -> list[tuple]:
    """(kernel layer, BatchNorm layer or None), graph order: conv -> BN, convs with a bias, Dense."""
    import keras

    pairs = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            pairs.append((layer, None))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            nodes = layer._outbound_nodes
            bn = nodes[0].operation if len(nodes) == 1 else None
            if not layer.use_bias and isinstance(bn, keras.layers.BatchNormalization):
                pairs.append((layer, bn))
            elif layer.use_bias:
                pairs.append((layer, None))
    return pairs


def _padded(x: np.ndarray, layer) -> tuple[np.ndarray, int, int, int]:
    """Input x as the kernel reads it ((B, H, W, C), "same" padding applied; Dense: 1x1), and the
    kernel's height, width and stride."""
    if x.ndim == 2:
        return x[:, None, None, :], 1, 1, 1
    kh, kw = layer.kernel_size
    s = layer.strides[0]
    if layer.padding == "same":  # the builder pads stride-2 layers itself and uses "valid" there
        if s != 1:
            raise ValueError(f"{layer.name}: 'same' padding with stride {s} is not supported")
        x = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    return x, kh, kw, s


def _depthwise(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.DepthwiseConv2D)


def layer_statistics(model, targets, images: np.ndarray, hessians: bool = True, batch: int = 5,
                     progress_label: str | None = None, seed: int = 0):
    """Per target, over the images, in the float model: the mean input patch (K, C) and, with
    `hessians`, H = E[x x^T] of its input patches ((1, K*C, K*C), or (C, K, K) per depthwise channel)."""
    import contextlib

    import keras

    from .data import progress

    probe = keras.Model(model.inputs, [layer.input for layer, _ in targets])
    rng = np.random.default_rng(seed)
    means, grams = [0.0] * len(targets), [0.0] * len(targets)
    starts = range(0, len(images), batch)
    with progress(starts, progress_label) if progress_label else contextlib.nullcontext(starts) as starts:
        for i in starts:
            chunk = images[i:i + batch].astype(np.float32)
            outs = probe([chunk], training=False)  # a list, as model.inputs is: no structure warning
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for j, ((layer, _), x) in enumerate(zip(targets, outs)):
                x, kh, kw, s = _padded(np.asarray(x, np.float32), layer)
                ho, wo = (x.shape[1] - kh) // s + 1, (x.shape[2] - kw) // s + 1
                taps = [(dy, dx) for dy in range(kh) for dx in range(kw)]  # the kernel's (kh, kw) order
                total = x.sum(axis=0)
                means[j] = means[j] + np.stack([total[dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s].sum((0, 1))
                                                for dy, dx in taps]).astype(np.float64) / (ho * wo)
                if not hessians:
                    continue
                rows, cols = np.divmod(rng.choice(ho * wo, min(HESSIAN_ROWS, ho * wo), replace=False), wo)
                patches = np.stack([x[:, dy + s * rows, dx + s * cols, :] for dy, dx in taps], axis=2)
                patches = patches.reshape(-1, len(taps), x.shape[-1])  # (n, K, C)
                if _depthwise(layer):
                    per_channel = np.ascontiguousarray(patches.transpose(2, 0, 1))  # (C, n, K): BLAS, not a loop
                    gram = per_channel.transpose(0, 2, 1) @ per_channel
                else:
                    flat = patches.reshape(len(patches), -1)
                    gram = (flat.T @ flat)[None]
                grams[j] = grams[j] + gram.astype(np.float64) * (len(chunk) / len(patches))
    n = len(images)
    return [m / n for m in means], [g / n if hessians else None for g in grams]


def _bn_factor(bn) -> np.ndarray:
    gamma, _, _, var = bn.get_weights()
    return gamma / np.sqrt(var + bn.epsilon)


def folded_rows(layer, bn) -> np.ndarray:
    """The kernel as the converter stores it (BatchNorm folded in), as (G, R, K) rows: one row per
    output channel (its own int8 scale), K inputs; G groups with their own H (depthwise: channels)."""
    kernel = layer.get_weights()[0]
    if _depthwise(layer):  # (kh, kw, C, 1)
        rows = kernel[..., 0].reshape(-1, kernel.shape[2]).T[:, None, :]
    else:  # Conv2D (kh, kw, in, out) or Dense (in, out)
        rows = kernel.reshape(-1, kernel.shape[-1]).T[None]
    factor = 1.0 if bn is None else _bn_factor(bn).reshape(rows.shape[:2] + (1,))
    return (rows * factor).astype(np.float64)


def _unfolded_kernel(layer, bn, rows: np.ndarray) -> np.ndarray:
    kernel = layer.get_weights()[0]
    if bn is not None:
        f = _bn_factor(bn).reshape(rows.shape[:2] + (1,))
        rows = rows / np.where(f == 0, 1.0, f)
    if _depthwise(layer):
        return rows[:, 0, :].T.reshape(kernel.shape).astype(np.float32)
    return rows[0].T.reshape(kernel.shape).astype(np.float32)


def _scales(rows: np.ndarray) -> np.ndarray:
    scale = np.abs(rows).max(axis=-1, keepdims=True) / LEVELS
    return np.where(scale == 0, 1.0, scale)


def nearest(rows: np.ndarray) -> np.ndarray:
    """Rows rounded as the converter rounds them: per row, scale = max|w| / 127."""
    scale = _scales(rows)
    return np.round(rows / scale) * scale


def gptq(rows: np.ndarray, gram: np.ndarray, damping: float = GPTQ_DAMPING) -> np.ndarray:
    """GPTQ-rounded rows (G, R, K) on the converter's grid. A row whose largest weight GPTQ moved off
    +-127 steps (the converter would rescale it) keeps nearest rounding."""
    scale = _scales(rows)
    plain = np.round(rows / scale) * scale
    g, _, k = rows.shape
    gram = gram.copy()
    diag = np.einsum("gkk->gk", gram)
    gram[:, np.arange(k), np.arange(k)] += np.where(diag <= 0, 1.0, 0.0) + damping * diag.mean(-1, keepdims=True)
    order = np.argsort(-np.einsum("gkk->gk", gram), axis=-1)  # largest input energy first
    gram = np.take_along_axis(np.take_along_axis(gram, order[:, :, None], 1), order[:, None, :], 2)
    w = np.take_along_axis(rows, order[:, None, :], 2).copy()
    upper = np.linalg.cholesky(np.linalg.inv(gram)).transpose(0, 2, 1)  # inverse H = U^T U
    q = np.zeros_like(w)
    s = scale[..., 0]
    for start in range(0, k, GPTQ_BLOCK):  # columns in blocks; the rest of the kernel updated once per block
        end = min(start + GPTQ_BLOCK, k)
        block, errors = w[..., start:end].copy(), np.zeros_like(w[..., start:end])
        for i in range(end - start):
            col = start + i
            q[..., col] = np.clip(np.round(block[..., i] / s), -LEVELS, LEVELS) * s
            errors[..., i] = (block[..., i] - q[..., col]) / upper[:, col, col][:, None]
            block[..., i + 1:] -= errors[..., i, None] * upper[:, None, col, col + 1:end]
        w[..., end:] -= errors @ upper[:, start:end, end:]
    q = np.take_along_axis(q, np.argsort(order, axis=-1)[:, None, :], 2)
    keeps_scale = np.abs(np.round(q / scale)).max(axis=-1) == LEVELS
    return np.where(keeps_scale[..., None], q, plain)


def prepare_int8(model, images: np.ndarray, correction: str = "gptq", progress_label: str | None = "measuring layers"):
    """A float copy of `model` whose int8 weights are rounded and biases corrected (see module doc).

    correction: "gptq" or "bias" (CORRECTIONS); "none" returns the model itself."""
    import contextlib

    from .data import progress

    if correction == "none":
        return model
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown weight correction {correction!r} (one of {', '.join(CORRECTIONS)})")
    targets = int8_targets(model)
    means, grams = layer_statistics(model, targets, images, hessians=correction == "gptq",
                                    progress_label=progress_label)
    out = _copy(model)
    items = list(zip(targets, means, grams))
    label = "rounding weights (GPTQ)" if correction == "gptq" else None
    with progress(items, label) if label and progress_label else contextlib.nullcontext(items) as items:
        for (layer, bn), mean, gram in items:
            rows = folded_rows(layer, bn)
            q = gptq(rows, gram) if gram is not None else nearest(rows)
            copy = out.get_layer(layer.name)
            weights = copy.get_weights()
            weights[0] = _unfolded_kernel(layer, bn, q)
            delta = q - rows  # (G, R, K); mean is (K taps, C)
            if _depthwise(layer):
                shift = np.einsum("ck,kc->c", delta[:, 0], mean)
            else:
                shift = delta[0] @ mean.reshape(-1)
            if bn is None:
                weights[1] = (weights[1] - shift).astype(np.float32)
            else:
                copy_bn = out.get_layer(bn.name)
                gamma, beta, moving_mean, var = copy_bn.get_weights()
                copy_bn.set_weights([gamma, (beta - shift).astype(np.float32), moving_mean, var])
            copy.set_weights(weights)
    return out


def _copy(model):
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # set_weights alone leaves call() on the old statistics
    return copy
