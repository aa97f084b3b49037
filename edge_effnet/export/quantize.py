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
and H of every kernel), run as one traced TensorFlow function that reduces each kernel's input to
these sums without leaving the graph; the copy computes almost the same function as the float
model. Cost for B1 with 100 images on 2 cores: about 17 s for the statistics (5 s of it tracing)
and 4 s for GPTQ.
"""
from __future__ import annotations

import numpy as np

from .formats import WEIGHT_CORRECTIONS

LEVELS = 127  # symmetric int8 weights: [-127, 127] * scale
GPTQ_DAMPING = 0.01   # added to H's diagonal, times its mean: H from a few images can be singular
# Output positions per image whose input patches build H: every position up to this many (all of a
# 181x181 map: the whole Lite family and B0-B3), so H and the rounding do not depend on a random draw.
# With 4096 sampled positions the int8 Lite1 file agreed with its float file on 96.3% of 300 photo crops
# for one seed and 98.0% with every position (benchmarks/results/int8_mixed.md).
HESSIAN_ROWS = 1 << 15
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


def _geometry(layer, shape) -> tuple:
    """How the kernel reads an input of `shape` ((B, H, W, C), or (B, C) for Dense): its taps (dy, dx)
    in the kernel's (kh, kw) order, stride, the padding "same" adds, and the output height and width."""
    if len(shape) == 2:
        return [(0, 0)], 1, ((0, 0), (0, 0)), 1, 1
    kh, kw = layer.kernel_size
    s = layer.strides[0]
    pad = ((0, 0), (0, 0))
    if layer.padding == "same":  # the builder pads stride-2 layers itself and uses "valid" there
        if s != 1:
            raise ValueError(f"{layer.name}: 'same' padding with stride {s} is not supported")
        pad = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    height, width = shape[1] + sum(pad[0]), shape[2] + sum(pad[1])
    taps = [(dy, dx) for dy in range(kh) for dx in range(kw)]
    return taps, s, pad, (height - kh) // s + 1, (width - kw) // s + 1


def _depthwise(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.DepthwiseConv2D)


def layer_statistics(model, targets, images: np.ndarray, hessians: bool = True, batch: int = 5,
                     progress_label: str | None = None, seed: int = 0):
    """Per target, over the images, in the float model: the mean input patch (K, C) and, with
    `hessians`, H = E[x x^T] of its input patches ((1, K*C, K*C), or (C, K, K) per depthwise channel).

    One traced TensorFlow function runs the model and reduces every target's input to these sums
    in the graph (the activations never leave it): means over every output position, H over every
    position too up to HESSIAN_ROWS per image (beyond: that many drawn with `seed`, the same for the
    images of one batch)."""
    import contextlib

    import keras
    import tensorflow as tf

    from ..console import progress

    probe = keras.Model(model.inputs, [layer.input for layer, _ in targets])
    shapes = [tuple(t.shape) for t in probe.outputs]
    geometry = [_geometry(layer, shape) for (layer, _), shape in zip(targets, shapes)]

    @tf.function(reduce_retracing=True)
    def sums(chunk, samples):
        outs = probe([chunk], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        results = []
        for (layer, _), x, (taps, s, pad, ho, wo), index in zip(targets, outs, geometry, samples):
            x = tf.reshape(x, (-1, 1, 1, x.shape[-1])) if len(x.shape) == 2 else tf.pad(x, ((0, 0), *pad, (0, 0)))
            total = tf.reduce_sum(x, 0)
            mean = tf.stack([tf.reduce_sum(total[dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s], (0, 1))
                             for dy, dx in taps])
            if not hessians:
                results.append((mean, tf.zeros(())))
                continue
            width, channels = x.shape[2], x.shape[3]
            patches = tf.gather(tf.reshape(x, (-1, x.shape[1] * width, channels)), index, axis=1)  # (B, n, K, C)
            if _depthwise(layer):  # one (K, n) x (n, K) product per channel (einsum takes 5x longer)
                per_channel = tf.reshape(tf.transpose(patches, (3, 2, 0, 1)), (channels, len(taps), -1))
                gram = tf.matmul(per_channel, per_channel, transpose_b=True)
            else:
                flat = tf.reshape(patches, (-1, len(taps) * channels))
                gram = tf.matmul(flat, flat, transpose_a=True)[None]
            results.append((mean, gram))
        return results

    rng = np.random.default_rng(seed)
    means, grams = [0.0] * len(targets), [0.0] * len(targets)
    starts = range(0, len(images), batch)
    with progress(starts, progress_label) if progress_label else contextlib.nullcontext(starts) as starts:
        for i in starts:
            chunk = images[i:i + batch].astype(np.float32)
            samples = []
            for (taps, s, pad, ho, wo), shape in zip(geometry, shapes):
                every = ho * wo <= HESSIAN_ROWS
                rows, cols = np.divmod(np.arange(ho * wo) if every else rng.choice(ho * wo, HESSIAN_ROWS, replace=False), wo)
                width = 1 if len(shape) == 2 else shape[2] + sum(pad[1])  # of the padded input
                samples.append(np.stack([(dy + s * rows) * width + dx + s * cols for dy, dx in taps], axis=1))
            for j, (mean, gram) in enumerate(sums(tf.constant(chunk), [tf.constant(x) for x in samples])):
                means[j] = means[j] + mean.numpy().astype(np.float64) / (geometry[j][3] * geometry[j][4])
                if hessians:  # per image: the sum over its sampled positions, averaged
                    grams[j] = grams[j] + gram.numpy().astype(np.float64) / len(samples[j])
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

    correction: "gptq" or "bias" (formats.WEIGHT_CORRECTIONS); "none" returns the model itself."""
    import contextlib

    from ..console import progress

    if correction == "none":
        return model
    if correction not in WEIGHT_CORRECTIONS:
        raise ValueError(f"unknown weight correction {correction!r} (one of {', '.join(WEIGHT_CORRECTIONS)})")
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
