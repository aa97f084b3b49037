"""The training recipe: schedule, optimizer, BN momentum, weight decay, MAC check, train/resume/transfer."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from edge_effnet.errors import UserError
from edge_effnet.train.recipe import TrainConfig
from edge_effnet.model.variants import from_scaling, get_variant

TINY = ["--width", "0.25", "--depth", "0.25", "--resolution", "32"]


@pytest.fixture(scope="module")
def T():
    from edge_effnet.train import train

    return train


def test_recipe_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.rho, c.momentum, c.epsilon, c.weight_decay, c.label_smoothing) == (0.9, 0.9, 1e-3, 1e-5, 0.1)
    assert (c.decay_rate, c.decay_epochs, c.drop_connect) == (0.97, 2.4, 0.2)
    assert TrainConfig(batch_size=4096).peak_learning_rate() == pytest.approx(0.256)  # paper: 0.256 at 4096
    assert TrainConfig(epochs=100).warmup() == 5 and TrainConfig(epochs=5).warmup() == 1
    with pytest.raises(UserError, match="validation split"):
        TrainConfig(validation_split=1.0).check()


def test_schedule_warms_up_then_decays_097_every_24_epochs(T):
    steps_per_epoch = 10
    s = T.WarmupExponentialDecay(peak=0.1, warmup_steps=20, decay_steps=24, rate=0.97)
    lr = {step: float(s(step)) for step in (0, 10, 19, 20, 23, 24, 47, 48, 240)}
    assert lr[0] == 0 and lr[10] == pytest.approx(0.05) and lr[19] == pytest.approx(0.095)
    assert lr[20] == pytest.approx(0.1) and lr[23] == pytest.approx(0.1)  # staircase: flat within 2.4 epochs
    assert lr[24] == pytest.approx(0.097) and lr[47] == pytest.approx(0.097)
    assert lr[48] == pytest.approx(0.1 * 0.97 ** 2)
    assert lr[240] == pytest.approx(0.1 * 0.97 ** 10)
    assert s.decay_steps == round(2.4 * steps_per_epoch)


def test_model_optimizer_bn_and_weight_decay(T):
    spec = from_scaling(0.25, 0.5, 32)  # depth 0.5 keeps some residual blocks
    model = T.build_classifier(spec, 7)
    T.add_weight_decay(model, 1e-5)
    T.compile_recipe(model, TrainConfig(batch_size=64), steps_per_epoch=10)
    bns = [l for l in model.layers if isinstance(l, T.keras.layers.BatchNormalization)]
    assert bns and {l.momentum for l in bns} == {0.99} and {l.epsilon for l in bns} == {1e-3}
    opt = model.optimizer
    assert type(opt).__name__ == "RMSprop" and (opt.rho, opt.momentum, opt.epsilon) == (0.9, 0.9, 1e-3)
    assert model.loss.label_smoothing == 0.1
    assert model.get_layer("predictions").units == 7 and model.get_layer("top_dropout").rate == spec.dropout
    decayed = [v for l in model.layers for v in l.trainable_weights if v.regularizer is not None]
    assert decayed and not any("bn" in v.path.split("/")[0] for v in decayed)
    assert len(model.losses) == len(decayed)
    drops = [l.rate for l in model.layers if l.name.endswith("_drop")]  # stochastic depth on residual blocks
    assert drops and max(drops) < 0.2


@pytest.mark.parametrize("name, res", [("b0", 64), ("lite0", 48), ("edgetpu-s", 40), ("b3", 32)])
def test_model_macs_equal_analytic_count(T, name, res):
    from edge_effnet.model.keras_io import count_model_macs
    from edge_effnet.model.scaling import count_macs

    spec = get_variant(name).with_options(resolution=res)
    model = T.build_classifier(spec, 10)
    assert count_model_macs(model) == count_macs(spec, num_classes=10)


def test_holdout_split_is_stratified_and_disjoint(T):
    labels = np.repeat(np.arange(4), [10, 5, 2, 30])
    train, val = T.holdout_split(labels, 0.2, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 1, 1, 6]
    with pytest.raises(UserError, match="two"):
        T.holdout_split(np.array([0, 1]), 0.2)


def test_train_cli_writes_model_history_and_transfers(tmp_path, digits_dir):
    out = tmp_path / "a.keras"
    r = run_cli("train", *TINY, "--data", digits_dir, "--epochs", "2", "--batch-size", "16", "-o", out)
    assert r.returncode == 0, r.stderr
    hist = json.loads((tmp_path / "a.history.json").read_text())
    assert [h["epoch"] for h in hist["history"]] == [1, 2] and hist["class_names"] == [str(i) for i in range(10)]
    assert hist["num_val"] == 10 and hist["num_train"] == 50 and 0 <= hist["val_accuracy"] <= 1
    assert hist["history"][1]["learning_rate"] > 0 and not (tmp_path / "a.ckpt").exists()
    # transfer: the backbone of a.keras, frozen; only the classifier moves
    b = tmp_path / "b.keras"
    r = run_cli("train", *TINY, "--data", digits_dir, "--epochs", "1", "--batch-size", "16",
                "--weights", out, "--freeze-backbone", "-o", b)
    assert r.returncode == 0, r.stderr
    from edge_effnet.model.keras_io import load_model_file

    ma, mb = load_model_file(str(out)), load_model_file(str(b))
    for name in ("stem_conv", "block1a_dwconv", "top_conv", "top_bn"):
        for wa, wb in zip(ma.get_layer(name).get_weights(), mb.get_layer(name).get_weights()):
            np.testing.assert_array_equal(wa, wb)
    head_a, head_b = ma.get_layer("predictions").get_weights()[0], mb.get_layer("predictions").get_weights()[0]
    assert not np.array_equal(head_a, head_b)
    pixels = np.zeros((1, 32, 32, 3), np.float32)
    assert mb.predict(pixels, verbose=0).shape == (1, 10)


def test_interrupted_training_resumes_from_its_checkpoint(T, tmp_path, digits_dir):
    spec = from_scaling(0.25, 0.25, 32)
    out = str(tmp_path / "m.keras")
    config = TrainConfig(epochs=2, batch_size=16)
    real_log = T.HistoryLog.on_epoch_end

    def stop_after_first(self, epoch, logs=None):
        real_log(self, epoch, logs)
        raise KeyboardInterrupt  # as a user's Ctrl-C after epoch 1's checkpoint

    T.HistoryLog.on_epoch_end = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(spec, str(digits_dir), out, config)
    finally:
        T.HistoryLog.on_epoch_end = real_log
    ckpt = tmp_path / "m.ckpt"
    first = json.loads((ckpt / "history.json").read_text())
    assert [h["epoch"] for h in first] == [1] and not os.path.exists(out)
    with pytest.raises(UserError, match="--resume"):
        T.train(spec, str(digits_dir), out, config)
    with pytest.raises(UserError, match="differ"):
        T.train(spec, str(digits_dir), out, TrainConfig(epochs=3, batch_size=16), resume=True)
    result = T.train(spec, str(digits_dir), out, config, resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.history[0] == first[0]
    assert os.path.exists(out) and not ckpt.exists()


@pytest.mark.parametrize("args, message", [
    (["--variant", "b0", "--data", "ONE"], "at least two classes"),
    (["--variant", "b0", "--data", "NOPE"], "not a folder"),
    (["--variant", "b0", "--data", "DIGITS", "--freeze-backbone"], "needs --weights"),
    (["--variant", "b0", "--data", "DIGITS", "--validation-split", "0"], "validation split"),
    (["--variant", "b0", "--data", "DIGITS", "--weights", "/no/such.keras"], "not found"),
])
def test_train_bad_input_is_one_line(tmp_path, digits_dir, args, message):
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    (one / "x.png").write_bytes((digits_dir / "0" / os.listdir(digits_dir / "0")[0]).read_bytes())
    args = [{"ONE": tmp_path / "one", "NOPE": tmp_path / "nope", "DIGITS": digits_dir}.get(a, a) for a in args]
    r = run_cli("train", *args, "-o", tmp_path / "m.keras")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "m.keras").exists()
