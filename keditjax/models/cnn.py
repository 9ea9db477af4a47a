"""A small CNN image classifier: the module, `Classifier`, training, a cache.

  classifier = cnn.train_classifier(images_NxHxWxC, labels_N, steps=1500,
                                    batch_size=64, lr=1e-3, seed=0)
  logits_BxK = classifier.logits(classifier.params, images_BxHxWxC)
  classifier, info = cnn.load_or_train(images, labels, steps=1500, ...)

Architecture (`CNN`): conv1 (3x3, channels[0]) -> ReLU -> 2x2 avg-pool ->
conv2 (3x3, channels[1]) -> ReLU -> 2x2 avg-pool -> flatten -> dense1
(hidden) -> ReLU -> head (num_classes). `Classifier.params` is the bare
parameter dict, so leaf paths read `conv1/kernel`, `dense1/bias`,
`head/kernel`: the paths editors match their `params_regex` against.

Cache: `load_or_train` keys a msgpack file by the model config, the training
hyper-parameters and a digest of the training arrays. A file that cannot be
read back into the expected parameter tree raises `CheckpointError` naming
it (delete it to retrain) rather than being silently replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from keditjax import errors
from keditjax import progress as progress_lib

_PREDICT_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The CNN's shape.

  Attributes:
    num_classes: output classes K.
    image_shape: (H, W, C) of one input image.
    channels: output channels of conv1 and conv2.
    hidden: width of dense1.
  """
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (28, 28, 1)
  channels: tuple[int, int] = (16, 32)
  hidden: int = 64

  def __post_init__(self):
    if self.num_classes < 2:
      raise errors.ConfigError(f"num_classes={self.num_classes} must be >= 2.")
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise errors.ConfigError(
          f"image_shape={self.image_shape} must be a positive (H, W, C).")
    if len(self.channels) != 2 or min(self.channels) < 1 or self.hidden < 1:
      raise errors.ConfigError(
          f"channels={self.channels} (two positive ints) and hidden="
          f"{self.hidden} (positive) are required.")


class CNN(nn.Module):
  """conv1 -> conv2 -> dense1 -> head; see the module docstring."""
  config: ClassifierConfig

  @nn.compact
  def __call__(self, x_BxHxWxC):
    """Returns (logits_BxK, out): `out` names the intermediate activations."""
    out = {}
    x = x_BxHxWxC
    for i, width in enumerate(self.config.channels):
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv{i + 1}")(x))
      out[f"conv{i + 1}"] = x
      # Average, not max, pooling: XLA's CPU max-pool gradient
      # (select-and-scatter) made training steps 3x slower.
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x_BxF = x.reshape((x.shape[0], -1))
    h_BxD = nn.relu(nn.Dense(self.config.hidden, name="dense1")(x_BxF))
    out["dense1"] = h_BxD
    logits_BxK = nn.Dense(self.config.num_classes, name="head")(h_BxD)
    out["head"] = logits_BxK
    return logits_BxK, out


class Classifier:
  """A CNN with its parameters; `logits` and `predict` take params explicitly.

  Attributes:
    config: the `ClassifierConfig`.
    params: the trained parameters (bare dict: `params["head"]["kernel"]`).
    name: a label carried into results.
  """

  # The leaves fine-tuning editors tune when given no `params_regex`: the
  # two dense layers (the convolutions stay fixed features).
  default_edit_regex = "dense1|head"

  def __init__(self, config: ClassifierConfig, params, name: str = "cnn"):
    self.config = config
    self.params = params
    self.name = name
    self.module = CNN(config)
    self._logits = jax.jit(
        lambda p, x: self.module.apply({"params": p}, x)[0])

  @property
  def num_classes(self) -> int:
    return self.config.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.config.image_shape)

  def logits(self, params, images_BxHxWxC):
    """Pure and jit-friendly: the class logits, float32[B, K]."""
    return self._logits(params, images_BxHxWxC)

  def predict(self, params, images_BxHxWxC) -> np.ndarray:
    """Argmax labels, int32[B], in chunks padded to power-of-two sizes (so a
    run compiles a handful of shapes, not one per batch size)."""
    images = np.asarray(images_BxHxWxC, np.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise errors.InputError(
          f"images have shape {images.shape}; expected [B, "
          f"{', '.join(map(str, self.image_shape))}].")
    labels = []
    for start in range(0, len(images), _PREDICT_CHUNK):
      chunk = images[start:start + _PREDICT_CHUNK]
      size = max(8, 1 << (len(chunk) - 1).bit_length())
      padded = np.zeros((size,) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      logits = self._logits(params, padded)
      labels.append(np.asarray(jnp.argmax(logits, -1))[:len(chunk)])
    if not labels:
      return np.zeros((0,), np.int32)
    return np.concatenate(labels).astype(np.int32)


def init_classifier(config: ClassifierConfig, seed: int = 0) -> Classifier:
  """A randomly initialised classifier."""
  module = CNN(config)
  params = module.init(jax.random.key(seed),
                       jnp.zeros((1,) + tuple(config.image_shape)))["params"]
  return Classifier(config, params)


def _check_training_data(images, labels, steps, batch_size, lr):
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise errors.InputError(
        f"train_images must be float [N, H, W, C]; got {images.dtype} "
        f"{images.shape}.")
  if labels.shape != (len(images),) or not np.issubdtype(labels.dtype,
                                                         np.integer):
    raise errors.InputError(
        f"train_labels must be int [{len(images)}]; got {labels.dtype} "
        f"{labels.shape}.")
  if len(labels) == 0 or labels.min() < 0:
    raise errors.InputError("train_labels must be non-empty and >= 0.")
  if steps < 1 or not 1 <= batch_size <= len(images) or not lr > 0:
    raise errors.ConfigError(
        f"steps={steps} (>= 1), batch_size={batch_size} (1..{len(images)}) "
        f"and lr={lr} (> 0) are required.")
  return images.astype(np.float32), labels.astype(np.int32)


def make_train_step(module: CNN, optimizer: optax.GradientTransformation,
                    label_smoothing: float = 0.0):
  """A jitted `train_step((params, opt_state), images, labels, idx_B)` ->
  `((params, opt_state), loss)`: one Adam step of mean cross-entropy (with
  `label_smoothing`) on the rows `idx_B`. The state argument is donated."""
  def train_step(state, images_NxHxWxC, labels_N, idx_B):
    params, opt_state = state

    def loss_fn(p):
      logits_BxK, _ = module.apply({"params": p}, images_NxHxWxC[idx_B])
      targets_BxK = optax.smooth_labels(jax.nn.one_hot(
          labels_N[idx_B], logits_BxK.shape[-1]), label_smoothing)
      return optax.softmax_cross_entropy(logits_BxK, targets_BxK).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return jax.jit(train_step, donate_argnums=0)


def train_classifier(train_images, train_labels, *, steps: int = 1500,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     label_smoothing: float = 0.0,
                     config: ClassifierConfig | None = None,
                     progress: bool = True) -> Classifier:
  """Trains a `CNN` with Adam on mean cross-entropy.

  Args:
    train_images: float32[N, H, W, C] (not modified).
    train_labels: int[N] in [0, K).
    steps: optimizer steps.
    batch_size: examples per step (epochs are seeded permutations).
    lr: Adam learning rate.
    seed: initialisation and shuffling seed.
    label_smoothing: α of `optax.smooth_labels`. Smoothing caps the logit
      margins a trained network reaches (about log((1-α)(K-1)/α)), so an
      edit need not move them far (0.1 keeps MNIST margins near 4 instead
      of 15+).
    config: the architecture (default: K = max label + 1, H, W, C from the
      images).
    progress: show a tqdm bar.

  Returns:
    The trained `Classifier`.
  """
  images, labels = _check_training_data(train_images, train_labels, steps,
                                        batch_size, lr)
  if config is None:
    config = ClassifierConfig(num_classes=max(2, int(labels.max()) + 1),
                              image_shape=tuple(images.shape[1:]))
  if tuple(images.shape[1:]) != tuple(config.image_shape) or (
      labels.max() >= config.num_classes):
    raise errors.InputError(
        f"images {images.shape[1:]} / labels up to {labels.max()} do not fit "
        f"the config {config}.")
  classifier = init_classifier(config, seed)
  optimizer = optax.adam(lr)
  state = (classifier.params, optimizer.init(classifier.params))
  if not 0 <= label_smoothing < 1:
    raise errors.ConfigError(
        f"label_smoothing={label_smoothing} must be in [0, 1).")
  train_step = make_train_step(classifier.module, optimizer, label_smoothing)
  images_dev, labels_dev = jnp.asarray(images), jnp.asarray(labels)
  rng = np.random.default_rng(seed)
  order, cursor = rng.permutation(len(images)), 0
  bar = progress_lib.trange(steps, desc="train cnn", disable=not progress)
  for step in bar:
    if cursor + batch_size > len(order):
      order, cursor = rng.permutation(len(images)), 0
    idx_B = jnp.asarray(order[cursor:cursor + batch_size])
    cursor += batch_size
    state, loss = train_step(state, images_dev, labels_dev, idx_B)
    if progress and (step % 100 == 0 or step == steps - 1):
      bar.set_postfix(loss=f"{float(loss):.3f}")
  return Classifier(config, jax.device_get(state[0]))


def default_cache_dir() -> str:
  """`$KEDITJAX_CACHE/vision` (default `~/.cache/keditjax/vision`)."""
  root = os.environ.get("KEDITJAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache",
                                     "keditjax"))
  return os.path.join(root, "vision")


def cache_key(config: ClassifierConfig, hparams: dict, images, labels) -> str:
  """A digest of everything a trained classifier depends on."""
  digest = hashlib.sha256(json.dumps(
      {"config": dataclasses.asdict(config), "hparams": hparams},
      sort_keys=True).encode())
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels).tobytes())
  return digest.hexdigest()[:16]


def save_params(path: str, params) -> None:
  """Writes `params` as flax msgpack, atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(jax.device_get(params)))
  os.replace(tmp, path)


def load_params(path: str, config: ClassifierConfig):
  """Reads params saved by `save_params`, checked against `config`'s tree.

  Raises:
    CheckpointError: unreadable file, or a tree/shape that does not match.
  """
  abstract = jax.eval_shape(lambda: init_classifier(config).params)
  try:
    with open(path, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    same = jax.tree.structure(params) == jax.tree.structure(abstract) and all(
        np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(abstract)))
  except Exception as e:  # msgpack raises many types on corrupt bytes.
    raise errors.CheckpointError(
        f"cached classifier {path} is corrupt ({type(e).__name__}: {e}); "
        "delete it to retrain.") from e
  if not same:
    raise errors.CheckpointError(
        f"cached classifier {path} does not match {config}; delete it to "
        "retrain.")
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def load_or_train(train_images, train_labels, *, steps: int = 1500,
                  batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                  label_smoothing: float = 0.0,
                  config: ClassifierConfig | None = None,
                  cache_dir: str | None = None, progress: bool = True):
  """`train_classifier`, cached on disk under `cache_dir`.

  Args:
    train_images, train_labels, steps, batch_size, lr, seed,
      label_smoothing, config, progress: as for `train_classifier`.
    cache_dir: where trained params live (default `default_cache_dir()`).

  Returns:
    (classifier, info): info has `cache_path`, `from_cache` and
    `train_seconds` (0 when loaded).

  Raises:
    CheckpointError: the cache file for these settings is corrupt.
  """
  images, labels = _check_training_data(train_images, train_labels, steps,
                                        batch_size, lr)
  if config is None:
    config = ClassifierConfig(num_classes=max(2, int(labels.max()) + 1),
                              image_shape=tuple(images.shape[1:]))
  hparams = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
  if label_smoothing:  # keeps the keys of unsmoothed caches
    hparams["label_smoothing"] = label_smoothing
  path = os.path.join(cache_dir or default_cache_dir(),
                      f"cnn-{cache_key(config, hparams, images, labels)}"
                      ".msgpack")
  if os.path.exists(path):
    return (Classifier(config, load_params(path, config)),
            {"cache_path": path, "from_cache": True, "train_seconds": 0.0})
  start = time.perf_counter()
  classifier = train_classifier(images, labels, config=config,
                                progress=progress, **hparams)
  seconds = time.perf_counter() - start
  save_params(path, classifier.params)
  return classifier, {"cache_path": path, "from_cache": False,
                      "train_seconds": seconds}
