"""Bias correction for int8 weights: the invariant it promises, on a small model with real photos."""
import numpy as np
import pytest

from edge_effnet import photoset
from edge_effnet.variants import from_scaling


def randomized(spec):
    """A small model with random weights and non-trivial BatchNorm statistics (as trained ones have)."""
    from edge_effnet.models import create_model

    model = create_model(spec, batch_size=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 3, g.shape), rng.uniform(-0.5, 0.5, b.shape),
                               rng.uniform(-0.2, 0.2, m.shape), rng.uniform(0.05, 2, v.shape)])
    return model


@pytest.mark.parametrize("family", ["lite", "efficientnet"])
def test_rounded_weights_keep_the_float_channel_means(family):
    from edge_effnet.quantize import _channel_means, _copy, _quantized_kernel, correct_bias, correctable_layers

    model = randomized(from_scaling(0.25, 0.25, 64, family=family))  # lite: fixed 32-channel stem, 8-channel stage 1
    images = photoset.render(photoset.calibration_crops(16), 64)
    fixed = correct_bias(model, images, progress_label=None)
    pairs = correctable_layers(model)
    assert len(pairs) >= 10 and pairs[-1][1] is None  # every conv+BN, then the classifier

    def rounded(m):
        q = _copy(m)
        for layer, bn in correctable_layers(q):
            q_weights = layer.get_weights()
            layer.set_weights([_quantized_kernel(layer, bn)] + q_weights[1:])
        return q

    def means(m):
        return _channel_means(m, [m.get_layer(bn.name).output for _, bn in pairs if bn], images)

    want, before, after = means(model), means(rounded(model)), means(rounded(fixed))
    # relative to each layer's largest channel mean (random BatchNorm statistics blow activations up)
    err_before = max(np.abs(b - w).max() / (np.abs(w).max() + 1) for b, w in zip(before, want))
    err_after = max(np.abs(a - w).max() / (np.abs(w).max() + 1) for a, w in zip(after, want))
    assert err_after < 1e-3 < err_before and err_after < err_before / 20
