"""The paper's training recipe, adapted to small data sets (a folder with one subfolder per class).

Recipe (paper section 5.2 and the official code): RMSProp (rho 0.9, momentum 0.9, epsilon 1e-3),
BatchNorm momentum 0.99 (Keras' default, checked by the tests), L2 weight decay 1e-5 on every
non-BatchNorm weight, learning rate 0.016 per 256 images with a linear warm-up and then x0.97
every 2.4 epochs (staircase), label smoothing 0.1, stochastic depth (the builder's drop-connect,
0.2 at the last block), the variant's dropout before the classifier. Adapted to small data:
warm-up min(5, epochs / 5) epochs instead of 5, light augmentation with Keras preprocessing
layers (shift, zoom, rotation; no flips, which would break digits and text) instead of
AutoAugment, no EMA of the weights (it needs far more steps than a small set gives).

Import this module only where TensorFlow is wanted (it imports keras).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_file, write_json
from .recipe import STRATEGIES, TrainConfig, checkpoint_dir_for, history_path_for  # noqa: F401
from ..console import import_keras
from ..model.spec import ModelSpec, spec_to_dict

keras = import_keras()
import tensorflow as tf  # noqa: E402  (after import_keras: quiet start-up)

HEAD_LAYERS = ("avg_pool", "top_dropout", "predictions")  # the builder's classifier; the rest is the backbone


@dataclass
class TrainResult:
    model: object  # keras.Model (dynamic batch, no optimizer state)
    class_names: list[str]
    val_accuracy: float
    val_loss: float
    history: list[dict]
    num_train: int
    num_val: int
    seconds: float

    def summary(self) -> dict:
        return dict(class_names=self.class_names, val_accuracy=self.val_accuracy, val_loss=self.val_loss,
                    num_train=self.num_train, num_val=self.num_val, seconds=round(self.seconds, 2),
                    history=self.history)


@keras.saving.register_keras_serializable(package="edge_effnet")
class WarmupExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then peak * rate^floor(step / decay_steps) (official EfficientNet)."""

    def __init__(self, peak: float, warmup_steps: int, decay_steps: int, rate: float = 0.97):
        self.peak, self.warmup_steps, self.decay_steps, self.rate = peak, warmup_steps, decay_steps, rate

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        decayed = self.peak * ops.power(self.rate, ops.floor(step / max(self.decay_steps, 1)))
        if self.warmup_steps <= 0:
            return decayed
        return ops.where(step < self.warmup_steps, self.peak * step / self.warmup_steps, decayed)

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps, rate=self.rate)


class HistoryLog(keras.callbacks.Callback):
    """The checkpoint, written after every epoch: the weights (with the optimizer's state) as
    epoch-N.weights.h5, then history.json (one row per finished epoch) naming them. Each file is
    written under a temporary name and renamed, and an epoch's weights are written before the
    history that names them, so a run killed at any moment leaves the last complete epoch to
    --resume; older weights files are removed only after the new history is in place."""

    def __init__(self, folder: str, rows: list[dict]):
        super().__init__()
        self.folder, self.rows = folder, rows

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row["learning_rate"] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))  # the schedule's value at the epoch's last step
        weights = os.path.join(self.folder, weights_file(epoch + 1))
        with atomic_file(weights) as tmp:
            self.model.save_weights(tmp)
        self.rows[:] = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        write_json(os.path.join(self.folder, "history.json"), self.rows)
        for name in os.listdir(self.folder):
            if name.startswith("epoch-") and name != os.path.basename(weights):
                os.remove(os.path.join(self.folder, name))


def weights_file(epoch: int) -> str:
    return f"epoch-{epoch:05d}.weights.h5"


def restore_checkpoint(model, folder: str, history: list[dict]) -> int:
    """Load the weights of the last finished epoch of `history` into `model`; returns that epoch."""
    if not history:
        return 0
    epoch = max(r["epoch"] for r in history)
    path = os.path.join(folder, weights_file(epoch))
    try:
        model.load_weights(path)
    except Exception as exc:  # h5py / keras errors of a damaged file
        raise UserError(f"cannot resume from {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                        "pass --force to start over") from None
    return epoch


_STRATEGY_CACHE: dict[str, object] = {}


def get_strategy(name: str = "default"):
    """The tf.distribute strategy to train under (one per process: multi-worker must be made once)."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    if name not in _STRATEGY_CACHE:
        _STRATEGY_CACHE[name] = {
            "default": tf.distribute.get_strategy,
            "mirrored": tf.distribute.MirroredStrategy,
            "multi-worker": tf.distribute.MultiWorkerMirroredStrategy,  # cluster from TF_CONFIG
        }[name]()
    return _STRATEGY_CACHE[name]


def holdout_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices: `fraction` of every class (at least one image) held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    if not val:
        raise UserError("too few images for a held-out split: every class needs at least two")
    return rng.permutation(train), np.sort(val)


def augmenter(seed: int = 0):
    """Light geometric augmentation (Keras preprocessing layers), run in the input pipeline."""
    layers = keras.layers
    return keras.Sequential([
        layers.RandomTranslation(0.1, 0.1, seed=seed),
        layers.RandomZoom(0.1, seed=seed + 1),
        layers.RandomRotation(0.04, seed=seed + 2),  # about 15 degrees
    ], name="augment")


def make_dataset(pixels: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, training: bool,
                 augment: bool = False, seed: int = 0):
    ds = tf.data.Dataset.from_tensor_slices((pixels, labels))
    if training:
        ds = ds.shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    aug = augmenter(seed) if training and augment else None

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = aug(x, training=True)
        return x, tf.one_hot(y, num_classes)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def copy_weights_by_name(model, source) -> int:
    """Copy the weights of every layer of `source` whose name and shapes match a layer of `model`."""
    copied = 0
    for layer in source.layers:
        try:
            target = model.get_layer(layer.name)
        except ValueError:
            continue
        weights = layer.get_weights()
        if weights and [w.shape for w in weights] == [w.shape for w in target.get_weights()]:
            target.set_weights(weights)
            copied += 1
    return copied


def build_classifier(spec: ModelSpec, num_classes: int, weights: str | None = None, batch_size: int | None = None,
                     drop_connect: float = 0.2):
    """The builder's network with a `num_classes` classifier; backbone weights from `weights`.

    weights: none | imagenet | PATH (.h5 / .weights.h5 without top) | torch:PATH | a .keras model
    (for example an earlier `edge-effnet train` result): every layer whose name and shape match.
    """
    from ..model.builder import build_model
    from ..model.keras_io import load_model_file
    from ..model.weights import load_weights

    model = build_model(spec, num_classes=num_classes, batch_size=batch_size, drop_connect=drop_connect)
    # A new classifier starts at zero: keras' fan-out init (made for 1000 classes) gives logits of
    # standard deviation ~6 with 10 classes, and the first steps then fight a loss of ~8.
    head = model.get_layer("predictions")
    head.kernel.assign(np.zeros(head.kernel.shape, "float32"))
    if weights in (None, "", "none"):
        return model
    if weights.endswith(".keras"):
        copied = copy_weights_by_name(model, load_model_file(weights))
        if copied == 0:
            raise UserError(f"no layer of {weights} matches {spec.name} by name and shape")
        return model
    backbone = keras.Model(model.inputs, model.get_layer("top_activation").output)  # shares the layers
    load_weights(backbone, spec, weights, include_top=False)
    return model


def add_weight_decay(model, weight_decay: float) -> None:
    """L2 on every trainable non-BatchNorm weight, as the official loss: wd * sum(v^2) / 2."""
    if weight_decay <= 0:
        return
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        for variable in layer.trainable_weights:
            variable.regularizer = keras.regularizers.L2(weight_decay / 2)


def compile_recipe(model, config: TrainConfig, steps_per_epoch: int) -> None:
    schedule = WarmupExponentialDecay(
        peak=config.peak_learning_rate(),
        warmup_steps=int(round(config.warmup() * steps_per_epoch)),
        decay_steps=max(1, int(round(config.decay_epochs * steps_per_epoch))),
        rate=config.decay_rate)
    optimizer = keras.optimizers.RMSprop(learning_rate=schedule, rho=config.rho, momentum=config.momentum,
                                         epsilon=config.epsilon)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                  jit_compile=False)  # XLA's compile time dwarfs a small run's training on CPUs
    # Create the optimizer's slots now, eagerly: created inside fit's first trace they cost about
    # 0.15 s each (600 for B1), a third of a small candidate's whole compile time.
    model.optimizer.build(model.trainable_variables)


def recalibrate_batchnorm(model, pixels: np.ndarray, batch_size: int = 64, max_images: int = 4096) -> None:
    """Re-estimate every trainable BatchNorm's moving mean and variance over the training images.

    With momentum 0.99 the moving statistics need several hundred steps to forget their start
    values, so a short run ends with statistics that do not fit its weights (measured on digits,
    270 steps: 31% held-out accuracy with them, 87% with batch statistics). One pass in training
    mode with a cumulative average ("precise BN") fixes that; dropout and stochastic depth are off
    during the pass. Frozen BatchNorm layers (trainable=False) keep their statistics.
    """
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
    drops = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
    if not bns:
        return
    saved = [l.momentum for l in bns], [l.rate for l in drops]
    try:
        for layer in drops:
            layer.rate = 0.0
        for k, start in enumerate(range(0, min(len(pixels), max_images), batch_size)):
            for layer in bns:
                layer.momentum = k / (k + 1)  # running average: batch k gets weight 1/(k+1)
            model(tf.constant(pixels[start:start + batch_size], tf.float32), training=True)
    finally:
        for layer, momentum in zip(bns, saved[0]):
            layer.momentum = momentum
        for layer, rate in zip(drops, saved[1]):
            layer.rate = rate


def _prepare_checkpoint(checkpoint_dir: str, run: dict, resume: bool, force: bool) -> list[dict]:
    """Check or start the checkpoint folder; returns the history rows of finished epochs."""
    from ..fsutil import check_output

    run_file = os.path.join(checkpoint_dir, "run.json")
    if os.path.lexists(checkpoint_dir):
        check_output(checkpoint_dir, True, "checkpoint")  # never discards a folder that is not ours
    exists = os.path.isfile(run_file)
    if exists and not resume and not force:
        raise UserError(f"{checkpoint_dir} holds an interrupted run; pass --resume to continue it "
                        "or --force to start over")
    if resume and not exists:
        raise UserError(f"nothing to resume: no checkpoint at {checkpoint_dir}")
    if exists and resume:
        with open(run_file) as f:
            saved = json.load(f)
        changed = sorted(k for k in run.keys() | saved.keys() if run.get(k) != saved.get(k))
        if changed:
            raise UserError(f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}")
        history_file = os.path.join(checkpoint_dir, "history.json")
        if os.path.isfile(history_file):
            with open(history_file) as f:
                return json.load(f)
        return []
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    try:
        os.makedirs(checkpoint_dir)
    except OSError as exc:
        from ..fsutil import os_error

        raise os_error(checkpoint_dir, exc) from None
    write_json(run_file, run)
    return []


def train_arrays(spec: ModelSpec, pixels: np.ndarray, labels: np.ndarray, class_names: list[str],
                 config: TrainConfig = TrainConfig(), weights: str | None = None,
                 checkpoint_dir: str | None = None, resume: bool = False, force: bool = False,
                 verbose: int | str = "auto", run_info: dict | None = None) -> TrainResult:
    """Train `spec` on in-memory pixels (N, R, R, 3) with the recipe; evaluate on a held-out split."""
    config.check()
    start = time.perf_counter()
    train_idx, val_idx = holdout_split(labels, config.validation_split, config.seed)
    num_classes = len(class_names)
    history: list[dict] = []
    callbacks = []
    if checkpoint_dir:
        run = dict(run_info or {}, spec=spec_to_dict(spec), config=asdict(config), weights=weights,
                   num_classes=num_classes, num_images=int(len(labels)))
        history = _prepare_checkpoint(checkpoint_dir, json.loads(json.dumps(run)), resume, force)
        callbacks = [HistoryLog(checkpoint_dir, history)]
    keras.utils.set_random_seed(config.seed)
    strategy = get_strategy(config.strategy)
    steps = math.ceil(len(train_idx) / config.batch_size)
    with strategy.scope():
        model = build_classifier(spec, num_classes, weights, drop_connect=config.drop_connect)
        if config.freeze_backbone:
            for layer in model.layers:
                layer.trainable = layer.name in HEAD_LAYERS
        add_weight_decay(model, config.weight_decay)
        compile_recipe(model, config, steps)
    train_ds = make_dataset(pixels[train_idx], labels[train_idx], num_classes, config.batch_size, True,
                            config.augment, config.seed)
    val_ds = make_dataset(pixels[val_idx], labels[val_idx], num_classes, config.batch_size, False)
    done = restore_checkpoint(model, checkpoint_dir, history) if checkpoint_dir else 0
    fit = model.fit(train_ds, epochs=config.epochs, callbacks=callbacks, verbose=verbose, initial_epoch=done,
                    shuffle=False)  # the dataset shuffles
    recalibrate_batchnorm(model, pixels[train_idx], max(config.batch_size, 64))
    val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)
    if not callbacks:  # no checkpoint folder: the history lives in memory only
        history = [{"epoch": e + 1, **{k: float(v[i]) for k, v in fit.history.items()}}
                   for i, e in enumerate(fit.epoch)]
    plain = keras.Model(model.inputs, model.outputs, name=model.name)  # same layers, no optimizer state
    return TrainResult(plain, list(class_names), float(val_accuracy), float(val_loss), list(history),
                       len(train_idx), len(val_idx), time.perf_counter() - start)


def train(spec: ModelSpec, data_dir: str, output: str, config: TrainConfig = TrainConfig(),
          weights: str | None = None, resume: bool = False, force: bool = False) -> TrainResult:
    """`edge-effnet train`: read DATA, train with checkpoints beside OUTPUT, write OUTPUT and its history."""
    from ..data import labeled_images

    pixels, labels, class_names = labeled_images(data_dir, spec.resolution)
    checkpoint_dir = checkpoint_dir_for(output)
    result = train_arrays(spec, pixels, labels, class_names, config, weights, checkpoint_dir, resume, force,
                          run_info={"data": os.path.abspath(data_dir)})
    with atomic_file(output) as tmp:
        result.model.save(tmp)
    summary = dict(result.summary(), model=os.path.abspath(output), spec=spec_to_dict(spec), config=asdict(config),
                   weights=weights or "none", data=os.path.abspath(data_dir))
    write_json(history_path_for(output), summary)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result
