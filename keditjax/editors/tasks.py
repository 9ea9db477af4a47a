"""Model families as the arrays a loss-driven editor needs.

Fine-tuning editors (FT, FT-L, FT+KL, EWC) see a model only through a task:

  batch = task.edit_batch(requests)   # {"labels": [B, T], "weights": [B, T], ...}
  logits_BxTxC = task.logits(params, batch)

so one loss, one KL and one Fisher kernel serve language models (T target
positions over the vocabulary) and classifiers (T = 1 over the classes).
Every batch is a dict of numpy arrays with padded, bucketed shapes (rows to a
power of two, lengths to 16), so repeated edits reuse one compilation.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors, stats
from keditjax.editors import base
from keditjax.models import lm


def rows_bucket(n: int) -> int:
  """Rows padded to a power of two (1, 2, 4, ...)."""
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def log_likelihood(logits_BxTxC, batch):
  """Σ_t w_t log p(label_t) per example: `[B]`."""
  logp = jax.nn.log_softmax(logits_BxTxC.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
  return jnp.sum(picked * batch["weights"], axis=-1)


def sample_labels(logits_BxTxC, rng):
  """Labels drawn from the model's own predictive distribution."""
  return jax.random.categorical(rng, logits_BxTxC.astype(jnp.float32), axis=-1)


class LanguageModelTask:
  """A decoder LM: requests are `Request`s; the label is the next token."""

  kind = "language_model"
  default_regex = r"^layers_4/mlp/down_proj/kernel$"

  def __init__(self, model):
    if model.tokenizer is None:
      raise errors.TokenizerError(f"{model!r} has no tokenizer.")
    self.model = model
    self.config = model.config

  def _rows(self, rows, weights_from):
    """`rows` of ids and the index where supervised labels start."""
    length = lm.bucket(max(len(r) for r in rows))
    if length > self.config.max_position_embeddings:
      raise errors.InputError(
          f"{length} tokens exceed max_position_embeddings="
          f"{self.config.max_position_embeddings}.")
    n = rows_bucket(len(rows))
    tokens = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    labels = np.zeros((n, length), np.int32)
    weights = np.zeros((n, length), np.float32)
    for i, (ids, start) in enumerate(zip(rows, weights_from)):
      tokens[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1
      labels[i, :len(ids) - 1] = ids[1:]
      weights[i, start:len(ids) - 1] = 1.0
    mask[:, 0] = 1  # padding rows attend to one token instead of none
    return {"tokens": tokens, "mask": mask, "labels": labels,
            "weights": weights}

  def edit_batch(self, requests) -> dict:
    """The prompt + target of every request, supervised on the target.

    Raises:
      InputError: a request without subject/target, or too long.
    """
    requests = base.make_requests(requests)
    rows, starts = [], []
    for r in requests:
      prompt, target = self.model.encode(r.text), self.model.encode(r.target_new)
      if not prompt or not target:
        raise errors.InputError(
            f"request {r.case_id!r}: prompt or target encodes to no tokens.")
      rows.append(prompt + target)
      starts.append(len(prompt) - 1)
    return self._rows(rows, starts)

  def text_batches(self, texts, *, length: int, examples: int,
                   batch_size: int):
    """Packed corpus rows of `length` tokens, supervised everywhere.

    Yields `(batch, real_rows)` with `batch_size` rows each (the last is
    padded with weight-0 rows); `examples` rows in all.
    """
    rows = stats.packed_rows(self.model.tokenizer, texts, length,
                             num_tokens=examples * length)
    rows = (r for r in rows if len(r) > 1)
    while True:
      block = list(itertools.islice(rows, batch_size))
      if not block:
        return
      batch = self._rows([r.tolist() for r in block], [0] * len(block))
      batch = pad_rows(batch, batch_size)
      yield batch, len(block)

  def logits(self, params, batch):
    logits, _ = lm.forward(self.config, params, batch["tokens"], batch["mask"])
    return logits


class ClassifierTask:
  """An image classifier: requests have `.image` and `.label` (or keys)."""

  kind = "classifier"

  def __init__(self, model):
    self.model = model
    self.num_classes = int(model.num_classes)
    self.image_shape = tuple(model.image_shape)
    self.default_regex = getattr(model, "default_edit_regex", ".*")

  def _field(self, item, name):
    value = item.get(name) if isinstance(item, Mapping) else getattr(
        item, name, None)
    if value is None:
      raise errors.InputError(f"an image edit needs a {name!r}; got {item!r}.")
    return value

  def check(self, item) -> tuple[np.ndarray, int]:
    """The validated `(image, label)` of one edit.

    Raises:
      InputError: a label outside `[0, num_classes)`, a wrong image shape,
        or a non-finite pixel.
    """
    image = np.asarray(self._field(item, "image"), np.float32)
    label = self._field(item, "label")
    case = item.get("case_id") if isinstance(item, Mapping) else getattr(
        item, "case_id", None)
    if not isinstance(label, (int, np.integer)) or not (
        0 <= int(label) < self.num_classes):
      raise errors.InputError(
          f"edit {case!r}: label {label!r} is not a class in "
          f"[0, {self.num_classes}).")
    if image.shape != self.image_shape:
      raise errors.InputError(
          f"edit {case!r}: image shape {image.shape} != the model's "
          f"{self.image_shape}.")
    if not np.all(np.isfinite(image)):
      raise errors.InputError(f"edit {case!r}: the image has NaN/inf pixels.")
    return image, int(label)

  def edit_batch(self, requests) -> dict:
    if isinstance(requests, Mapping) or hasattr(requests, "image"):
      requests = [requests]
    checked = [self.check(item) for item in requests]
    if not checked:
      raise errors.InputError("no edit requests given.")
    images = np.stack([c[0] for c in checked])
    labels = np.asarray([c[1] for c in checked], np.int32)
    return self.image_batch(images, labels)

  def image_batch(self, images, labels=None) -> dict:
    """A batch of images (labels default to class 0), all rows weighted 1."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != self.image_shape:
      raise errors.InputError(
          f"images of shape {images.shape[1:]} != the model's "
          f"{self.image_shape}.")
    labels = np.zeros(len(images), np.int32) if labels is None else labels
    batch = {"images": images, "labels": np.asarray(labels, np.int32)[:, None],
             "weights": np.ones((len(images), 1), np.float32)}
    return pad_rows(batch, rows_bucket(len(images)))

  def data_batches(self, data, *, batch_size: int, examples: int | None = None):
    """`(batch, real_rows)` over a `{"images", "labels"}` dataset."""
    images, labels = np.asarray(data["images"]), np.asarray(data["labels"])
    n = len(images) if examples is None else min(examples, len(images))
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      batch = self.image_batch(images[start:stop], labels[start:stop])
      yield pad_rows(batch, batch_size), stop - start

  def logits(self, params, batch):
    return self.model.logits(params, batch["images"])[:, None, :]


class TextClassifierTask:
  """A text classifier (e.g. `models.fact_checker.FactChecker`): requests
  are dicts (or objects) with a text under `claim` (or `text`) and the new
  `label`; batches carry `tokens`/`mask`, padded to 16-token buckets and
  power-of-two rows (FT and FT-L; FT+KL and EWC need image/corpus data)."""

  kind = "text_classifier"

  def __init__(self, model):
    self.model = model
    self.num_classes = int(model.num_classes)
    self.default_regex = getattr(model, "default_edit_regex", ".*")

  def check(self, item) -> tuple[str, int]:
    """The validated `(text, label)` of one edit.

    Raises:
      InputError: a missing/empty text or a label outside `[0, num_classes)`.
    """
    get = (item.get if isinstance(item, Mapping)
           else lambda k: getattr(item, k, None))
    text = get("claim") if get("claim") is not None else get("text")
    label = get("label")
    if not isinstance(text, str) or not text.strip():
      raise errors.InputError(
          f"a text edit needs a non-empty 'claim' (or 'text'); got {item!r}.")
    if not isinstance(label, (int, np.integer)) or not (
        0 <= int(label) < self.num_classes):
      raise errors.InputError(
          f"edit {get('case_id')!r}: label {label!r} is not a class in "
          f"[0, {self.num_classes}).")
    return text, int(label)

  def edit_batch(self, requests) -> dict:
    if isinstance(requests, Mapping) or hasattr(requests, "label"):
      requests = [requests]
    checked = [self.check(item) for item in requests]
    if not checked:
      raise errors.InputError("no edit requests given.")
    batch = self.model.text_batch([c[0] for c in checked])
    batch["labels"] = np.asarray([[c[1]] for c in checked], np.int32)
    batch["weights"] = np.ones((len(checked), 1), np.float32)
    return pad_rows(batch, rows_bucket(len(checked)))

  def logits(self, params, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
    return self.model.logits(params, inputs)[:, None, :]


def pad_rows(batch: dict, rows: int) -> dict:
  """Every array padded with zero rows (weight 0) to `rows` rows."""
  n = len(batch["weights"])
  if n >= rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def task_for(model) -> Any:
  """The task of `model`: a decoder LM or a classifier (`logits`+`num_classes`)."""
  if getattr(model, "is_text", False) and hasattr(model, "num_classes"):
    return TextClassifierTask(model)
  if hasattr(model, "logits") and hasattr(model, "num_classes"):
    return ClassifierTask(model)
  if isinstance(model, lm.LanguageModel):
    return LanguageModelTask(model)
  raise errors.ConfigError(
      f"fine-tuning editors need a decoder LanguageModel or a classifier with "
      f"`logits` and `num_classes`; got {type(model).__name__}.")


def model_key(model) -> tuple:
  """A hashable key for "models like `model`" (jitted-loop caches): its
  type and config, or the model object itself when it has no hashable
  config."""
  config = getattr(model, "config", None)
  try:
    hash(config)
  except TypeError:
    config = None
  if config is None:
    return (type(model).__qualname__, model)
  return (type(model).__module__, type(model).__qualname__, config)


def select(params, regex: str) -> dict:
  """`{path tuple: leaf}` of the leaves whose "a/b/c" path matches `regex`.

  Raises:
    ConfigError: the regex is invalid or selects no leaf.
  """
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise errors.ConfigError(f"params_regex={regex!r} is not a regex: {e}.")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = {}
  for key_path, leaf in flat:
    path = tuple(str(getattr(k, "key", k)) for k in key_path)
    if pattern.search("/".join(path)):
      chosen[path] = leaf
  if not chosen:
    examples = ["/".join(str(getattr(k, "key", k)) for k in kp)
                for kp, _ in flat[:4]]
    raise errors.ConfigError(
        f"params_regex={regex!r} selects no parameter; paths look like "
        f"{examples}.")
  return chosen


def merge(params, subset: Mapping[tuple, Any]):
  """`params` with the `subset` leaves replaced (traceable; no copies)."""
  return base.replace_leaves(params, subset)


__all__ = ["ClassifierTask", "LanguageModelTask", "TextClassifierTask",
           "log_likelihood", "merge", "pad_rows", "rows_bucket", "sample_labels",
           "select", "task_for"]
