"""Example models: `build(name, path)`, a cache (`example_model`) and a trained `digits_cnn`.

Seeded, random-weight Keras example models for the compiler, the tests and the benchmarks.
Contract: every model ends in logits (no softmax); every Keras Input has an explicit name
(`input`, or `image`/`vector` for multi_io) so ONNX input names are stable; the same name and
seed give the same weights. TensorFlow/Keras are imported lazily, inside functions, and their
absence raises MissingDependencyError. Nothing is downloaded (weights=None).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defer.errors import MissingDependencyError, UsageError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/defer/models")
SAVE_SUFFIXES = (".h5", ".keras")
# Part of every cached file name: bump it when a builder changes so stale caches are not reused.
BUILDERS_VERSION = 1


def _keras() -> Any:
    """The keras module (TensorFlow backend), or MissingDependencyError naming the extra."""
    try:
        import keras
        import tensorflow  # noqa: F401  (tf2onnx needs the TensorFlow backend)
    except ImportError as err:
        raise MissingDependencyError(
            f"the example models need TensorFlow and Keras ({err}); install defer-edge[keras]"
        ) from err
    return keras


def _seeded_keras(seed: int) -> Any:
    keras = _keras()
    keras.utils.set_random_seed(seed)
    return keras


# --- builders: each takes a seed and returns an uncompiled keras.Model ending in logits ---


def resnet50(seed: int = 0) -> Any:
    """keras.applications.ResNet50, random weights, 224x224x3 -> 1000 logits."""
    keras = _seeded_keras(seed)
    image = keras.Input((224, 224, 3), name="input")
    model = keras.applications.ResNet50(
        weights=None, input_tensor=image, classifier_activation=None
    )
    return _calibrate_batchnorm(model, seed)


def mobilenetv2(seed: int = 0) -> Any:
    """keras.applications.MobileNetV2, random weights, 224x224x3 -> 1000 logits."""
    keras = _seeded_keras(seed)
    image = keras.Input((224, 224, 3), name="input")
    model = keras.applications.MobileNetV2(
        weights=None, input_tensor=image, classifier_activation=None
    )
    return _calibrate_batchnorm(model, seed)


def inceptionv3(seed: int = 0) -> Any:
    """keras.applications.InceptionV3, random weights, 299x299x3 -> 1000 logits (branchy:
    four to six parallel branches per block, so the op order matters)."""
    keras = _seeded_keras(seed)
    image = keras.Input((299, 299, 3), name="input")
    model = keras.applications.InceptionV3(
        weights=None, input_tensor=image, classifier_activation=None
    )
    return _calibrate_batchnorm(model, seed, batch=2)


def densenet121(seed: int = 0) -> Any:
    """keras.applications.DenseNet121, random weights, 224x224x3 -> 1000 logits (dense
    blocks: every layer reads all earlier feature maps of its block)."""
    keras = _seeded_keras(seed)
    image = keras.Input((224, 224, 3), name="input")
    model = keras.applications.DenseNet121(
        weights=None, input_tensor=image, classifier_activation=None
    )
    return _calibrate_batchnorm(model, seed, batch=2)


def _calibrate_batchnorm(model: Any, seed: int, batch: int = 4) -> Any:
    """Set every BatchNormalization's moving mean/variance to its batch statistics on one
    seeded batch of uniform [0, 1) inputs, so each BN normalises its input in inference mode.

    Fresh BN layers (mean 0, variance 1) do not normalise: random MobileNetV2 logits come out
    near 1e-11, which makes fidelity checks (and lossy codecs) meaningless. One forward pass in
    training mode with momentum 0 is exact: every layer sees already-normalised inputs.
    """
    import numpy as np

    keras = _keras()
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return model
    rng = np.random.default_rng(seed)
    inputs = [rng.random((batch, *inp.shape[1:]), dtype=np.float32) for inp in model.inputs]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    try:
        model(inputs if len(inputs) > 1 else inputs[0], training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return model


def tiny_cnn(seed: int = 0) -> Any:
    """Two conv/pool blocks and two dense layers, 32x32x3 -> 10 logits. Builds in a second."""
    keras = _seeded_keras(seed)
    layers = keras.layers
    conv, dense = _he_layers(layers)
    image = keras.Input((32, 32, 3), name="input")
    x = conv(16, 3, padding="same", activation="relu", name="conv1")(image)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = conv(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = dense(64, activation="relu", name="fc")(x)
    logits = dense(10, name="logits")(x)
    return keras.Model(image, logits, name="tiny_cnn")


def densenet_tiny(seed: int = 0, blocks: int = 2, layers_per_block: int = 4) -> Any:
    """DenseNet-style, 32x32x3 -> 10 logits: each layer reads the concatenation of ALL earlier
    feature maps of its block (an explicit list, not a running concat), so many tensors cross
    most cuts."""
    keras = _seeded_keras(seed)
    layers = keras.layers
    conv, dense = _he_layers(layers)
    image = keras.Input((32, 32, 3), name="input")
    x = conv(16, 3, padding="same", name="stem")(image)
    for b in range(blocks):
        x = _dense_block(layers, conv, x, layers_per_block, growth=8, prefix=f"block{b}")
        if b < blocks - 1:
            x = _transition(layers, conv, x, channels=16, prefix=f"trans{b}")
    x = layers.BatchNormalization(name="final_bn")(x)
    x = layers.Activation("relu", name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logits = dense(10, name="logits")(x)
    return _calibrate_batchnorm(keras.Model(image, logits, name="densenet_tiny"), seed)


def _he_layers(layers: Any) -> tuple[Any, Any]:
    """Conv2D and Dense with He init: with Keras' default Glorot init, random ReLU stacks
    shrink the logits towards 0 (1e-2), which makes fidelity checks meaningless."""
    init = "he_normal"
    conv = partial(layers.Conv2D, kernel_initializer=init)
    return conv, partial(layers.Dense, kernel_initializer=init)


def _dense_block(layers: Any, conv: Any, x: Any, n_layers: int, growth: int, prefix: str) -> Any:
    features = [x]
    for i in range(n_layers):
        name = f"{prefix}_l{i}"
        h = features[0] if len(features) == 1 else layers.Concatenate(name=f"{name}_cat")(features)
        h = layers.BatchNormalization(name=f"{name}_bn")(h)
        h = layers.Activation("relu", name=f"{name}_relu")(h)
        features.append(conv(growth, 3, padding="same", name=f"{name}_conv")(h))
    return layers.Concatenate(name=f"{prefix}_out")(features)


def _transition(layers: Any, conv: Any, x: Any, channels: int, prefix: str) -> Any:
    x = layers.BatchNormalization(name=f"{prefix}_bn")(x)
    x = layers.Activation("relu", name=f"{prefix}_relu")(x)
    x = conv(channels, 1, name=f"{prefix}_conv")(x)
    return layers.AveragePooling2D(2, name=f"{prefix}_pool")(x)


def multi_io(seed: int = 0) -> Any:
    """Two inputs (`image` 32x32x3, `vector` 16) and two outputs (`logits` 10, `regression` 1)."""
    keras = _seeded_keras(seed)
    layers = keras.layers
    conv, dense = _he_layers(layers)
    image = keras.Input((32, 32, 3), name="image")
    vector = keras.Input((16,), name="vector")
    x = conv(16, 3, padding="same", activation="relu", name="conv1")(image)
    x = layers.MaxPooling2D(4, name="pool1")(x)
    x = conv(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    v = dense(32, activation="relu", name="vector_fc")(vector)
    h = layers.Concatenate(name="merge")([x, v])
    h = dense(64, activation="relu", name="fc")(h)
    logits = dense(10, name="logits")(h)
    regression = dense(1, name="regression")(h)
    return keras.Model([image, vector], [logits, regression], name="multi_io")


def wide_skip(seed: int = 0) -> Any:
    """64x64x3 -> 10 logits, built so that where you cut matters for bandwidth.

    The stem makes a 64x64x64 activation (1 MiB float32) with a residual skip around a 1x1
    conv, so cuts there carry 1-2 MiB; pooling shrinks it, and a 1x1 bottleneck to 16x16x4
    (4 KiB) sits near the middle of the compute (about 43 M multiply-adds before it, 29 M
    after): the cheap cut a bandwidth-aware partitioner should find. Global pooling (64 floats)
    gives another cheap cut near the end.
    """
    keras = _seeded_keras(seed)
    layers = keras.layers
    conv, dense = _he_layers(layers)
    image = keras.Input((64, 64, 3), name="input")
    wide = conv(64, 3, padding="same", activation="relu", name="stem")(image)  # 64x64x64
    h = conv(64, 1, activation="relu", name="wide_conv")(wide)
    h = layers.Add(name="wide_skip")([wide, h])
    h = layers.MaxPooling2D(2, name="pool1")(h)  # 32x32x64
    h = conv(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.MaxPooling2D(2, name="pool2")(h)  # 16x16x32
    h = conv(4, 1, activation="relu", name="bottleneck")(h)  # 16x16x4: the cheap cut
    h = conv(64, 3, padding="same", activation="relu", name="expand")(h)
    for i in range(3):
        h = conv(64, 3, padding="same", activation="relu", name=f"conv{3 + i}")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)  # 64 floats: another cheap cut
    h = dense(32, activation="relu", name="fc")(h)
    logits = dense(10, name="logits")(h)
    return keras.Model(image, logits, name="wide_skip")


EXAMPLES: dict[str, Callable[..., Any]] = {
    "resnet50": resnet50,
    "mobilenetv2": mobilenetv2,
    "inceptionv3": inceptionv3,
    "densenet121": densenet121,
    "tiny_cnn": tiny_cnn,
    "densenet_tiny": densenet_tiny,
    "multi_io": multi_io,
    "wide_skip": wide_skip,
}
SMALL_EXAMPLES = ("tiny_cnn", "densenet_tiny", "multi_io", "wide_skip")


def build(name: str, path: Path, seed: int = 0) -> Path:
    """Build example `name` with `seed` and save it to `path` (.h5 or .keras); return the path."""
    builder = _builder(name)
    path = Path(path)
    _check_suffix(path)
    start = time.perf_counter()
    model = builder(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    log.info("built %s (seed %d) -> %s in %.1f s", name, seed, path, time.perf_counter() - start)
    return path


def example_model(name: str = "resnet50", cache_dir: Path | None = None) -> Path:
    """The cached `.h5` of example `name` (seed 0), built once into `cache_dir`
    (default ~/.cache/defer/models) as `NAME-vN.h5`, N = BUILDERS_VERSION. The file appears
    atomically (temp file + os.replace): never half written; concurrent callers build it once."""
    _builder(name)
    path = _cache_dir(cache_dir) / f"{name}-v{BUILDERS_VERSION}.h5"
    with _cache_lock(path):
        if path.is_file():
            log.debug("example %s cached at %s", name, path)
            return path
        log.info("building example model %s into %s (once)", name, path.parent)
        _atomic(path, lambda tmp: build(name, tmp))
    return path


def example_onnx(name: str = "resnet50", cache_dir: Path | None = None) -> Path:
    """The example converted to ONNX by the compiler's loader (tf2onnx), cached beside its
    `.h5` as `NAME-vN.onnx`: ResNet50's conversion takes ~20 s and ~7 GB, so it happens once."""
    h5 = example_model(name, cache_dir)
    path = h5.with_suffix(".onnx")
    with _cache_lock(path):
        if path.is_file():
            return path
        from defer.compiler.load import load_model

        log.info("converting example model %s to ONNX (once)", name)
        model = load_model(h5).model
        _atomic(path, lambda tmp: tmp.write_bytes(model.SerializeToString()))
    return path


def _cache_dir(cache_dir: Path | None) -> Path:
    path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _cache_lock(path: Path):
    """Hold an exclusive lock on the cache folder (no lock file left behind) so concurrent
    processes build each file only once."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    # Not mkstemp: its 0600 mode would survive os.replace; a unique name is enough here.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def digits_cnn(path: Path, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Train a small CNN on scikit-learn's bundled digits (8x8x1 in 0..1, 10 logits out), save
    it to `path` and return (path, x_test, y_test). Seeded; trains in seconds, > 95% accuracy."""
    path = Path(path)
    _check_suffix(path)
    keras = _seeded_keras(seed)
    x_train, x_test, y_train, y_test = _digits_split(seed)
    model = _digits_model(keras)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=15, batch_size=32, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    log.info("digits_cnn: test accuracy %.3f after %.1f s", accuracy, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path, x_test, y_test


def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise MissingDependencyError(
            f"digits_cnn needs scikit-learn ({err}); install defer-edge[test]"
        ) from err
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]  # (n, 8, 8, 1) in 0..1
    labels = digits.target.astype("int64")
    return train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)


def _digits_model(keras: Any) -> Any:
    layers = keras.layers
    image = keras.Input((8, 8, 1), name="input")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(image)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    logits = layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="digits_cnn")


def _builder(name: str) -> Callable[..., Any]:
    try:
        return EXAMPLES[name]
    except KeyError:
        known = ", ".join(sorted(EXAMPLES))
        raise UsageError(f"unknown example model {name!r}; choose one of: {known}") from None


def _check_suffix(path: Path) -> None:
    if path.suffix not in SAVE_SUFFIXES:
        raise UsageError(
            f"cannot save a Keras model to {str(path)!r}: use a .h5 or .keras file name"
        )
