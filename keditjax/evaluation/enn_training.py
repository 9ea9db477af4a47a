"""The training recipe of editable training (ENN) on the vision CNN.

`editors/enn.py` holds the math (the unrolled editor, `meta_loss`, the
`Editor`); this module binds it to data: the ordinary CNN trained on a
vision dataset (`vision_data`), meta-training batches of base rows and
flips, and the trainer's `Objective`.

  config = enn_training.default_config()   # experiments/configs/enn_cnn_mnist.py
  objective, batch_fn, valid = enn_training.build(config)
  result = training.train(objective, config.train, batch_fn=batch_fn,
                          valid_batches=valid)
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import ml_collections
import numpy as np

from keditjax import errors, training
from keditjax.editors import enn, tasks
from keditjax.evaluation import vision_data
from keditjax.models import cnn


def check_config(config):
  """Refuses bad values of the ENN fields (unknown fields: `hypernet.check`)."""
  for field in ("batch_size", "edits_per_step", "inner_steps"):
    if int(config[field]) < 1:
      raise errors.ConfigError(f"{field}={config[field]} must be >= 1.")
  if not config.inner_lr > 0:
    raise errors.ConfigError(f"inner_lr={config.inner_lr} must be > 0.")
  if config.inner_optimizer not in enn.INNER_OPTIMIZERS:
    raise errors.ConfigError(f"inner_optimizer={config.inner_optimizer!r}; "
                             f"use one of {enn.INNER_OPTIMIZERS}.")
  if min(config.c_edit, config.c_loc, config.margin) < 0:
    raise errors.ConfigError("c_edit, c_loc and margin must be >= 0.")
  if not 0 <= config.random_flip_fraction <= 1:
    raise errors.ConfigError(
        f"random_flip_fraction={config.random_flip_fraction} must be in "
        "[0, 1].")


def load_base(config):
  """(data, classifier, info): the dataset and the ordinary CNN of `config`
  (trained with `config.base`, cached as `vision.prepare` does)."""
  data = vision_data.load_dataset(config.dataset, seed=config.seed)
  classifier, info = cnn.load_or_train(
      data.train_images, data.train_labels, steps=config.base.train_steps,
      batch_size=config.base.batch_size, lr=config.base.lr, seed=config.seed,
      label_smoothing=config.base.label_smoothing,
      cache_dir=config.get("cache_dir") or None, progress=False)
  return data, classifier, info


def sample_batch(images, labels, num_classes: int, config, step: int,
                 stream: int = 0):
  """A meta-training batch: a deterministic function of (`stream`, `step`).

  Base rows and edit rows are drawn independently from (images, labels);
  each edit asks for a random wrong class with probability
  `config.random_flip_fraction`, else for the runner-up.
  """
  rng = np.random.default_rng([int(config.seed), int(stream), int(step)])
  rows = rng.choice(len(labels), config.batch_size, replace=False)
  edits = rng.choice(len(labels), config.edits_per_step, replace=False)
  true = labels[edits].astype(np.int32)
  wrong = (true + 1 + rng.integers(num_classes - 1, size=len(edits))
           ) % num_classes
  return {"images": images[rows], "labels": labels[rows].astype(np.int32),
          "edit_images": images[edits], "edit_true": true,
          "edit_random": wrong.astype(np.int32),
          "edit_use_random": rng.random(len(edits)) <
                             config.random_flip_fraction}


def training_fingerprint(config, base_info) -> str:
  """A digest of the base weights' cache key and the data/editor recipe."""
  recipe = {k: config[k] for k in (
      "dataset", "seed", "params_regex", "inner_steps", "inner_lr",
      "inner_optimizer", "margin", "c_edit", "c_loc", "label_smoothing",
      "batch_size", "edits_per_step", "random_flip_fraction",
      "valid_holdout")}
  recipe["base"] = str(base_info["cache_path"]).rsplit("/", 1)[-1]
  return hashlib.sha256(json.dumps(recipe, sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]


def default_config():
  """The fields of an ENN config with the MNIST-5k CNN defaults
  (experiments/configs/enn_cnn_mnist.py; `hypernet.check` refuses others)."""
  config = ml_collections.ConfigDict()
  config.method = "enn"
  config.dataset = "mnist"
  config.seed = 0
  config.cache_dir = ""  # "" = $KEDITJAX_CACHE/vision
  # The ordinary CNN (vision.prepare's defaults).
  config.base = ml_collections.ConfigDict(dict(
      train_steps=1500, batch_size=64, lr=1e-3, label_smoothing=0.1))
  # The editor meta-trained for (ENNHParams: params_regex, inner_steps, lr,
  # optimizer, margin).
  config.params_regex = "dense1/kernel"
  config.inner_steps = 5
  config.inner_lr = 0.003
  config.inner_optimizer = "sgd"
  config.margin = 0.0  # the paper's l_e; 1.0: higher GR and SR, more DD
  config.max_steps = 100  # the editor's budget at edit time
  # The objective L_base + c_edit l_e(θ_k) + c_loc KL(p_θ ‖ p_θk).
  config.c_edit = 1.0
  config.c_loc = 10.0
  config.label_smoothing = 0.1
  config.batch_size = 64
  config.edits_per_step = 16
  config.random_flip_fraction = 0.25
  config.valid_holdout = 500
  config.valid_batches = 4
  config.train = training.default_config()
  config.train.steps = 1000
  config.train.learning_rate = 3e-4
  config.train.optimizer = "adam"
  config.train.eval_every = 100
  config.train.log_every = 50
  return config


def build(config):
  """The ENN objective on the vision CNN, for the shared trainer.

  Args:
    config: a ConfigDict (experiments/configs/enn_cnn_mnist.py): dataset,
      seed, base (the ordinary CNN's training), params_regex, inner_steps,
      inner_lr, inner_optimizer, margin, c_edit, c_loc, label_smoothing,
      batch_size, edits_per_step, random_flip_fraction, valid_holdout,
      valid_batches.

  Returns:
    (objective, batch_fn, valid_batches): the trainable params are the CNN
    params, initialised from the ordinary trained CNN; batches come from the
    training split minus its last `valid_holdout` images, which make the
    `valid_batches` fixed validation batches.

  Raises:
    ConfigError: a bad field, or a regex that selects no CNN leaf.
  """
  check_config(config)
  data, classifier, info = load_base(config)
  paths = tuple(sorted(tasks.select(classifier.params, config.params_regex)))
  n = len(data.train_labels)
  holdout = int(config.valid_holdout)
  rows = max(config.batch_size, config.edits_per_step)
  if not rows <= holdout <= n - rows:
    raise errors.ConfigError(
        f"valid_holdout={holdout} must be in [{rows}, {n - rows}] (at least "
        f"a batch of {rows} images on either side of {n}).")
  train_x, train_y = data.train_images[:-holdout], data.train_labels[:-holdout]
  valid_x, valid_y = data.train_images[-holdout:], data.train_labels[-holdout:]
  k = classifier.num_classes
  module = classifier.module
  logits_fn = lambda p, x: module.apply({"params": p}, x)[0]
  loss = functools.partial(
      enn.meta_loss, logits_fn, paths=paths, steps=int(config.inner_steps),
      lr=float(config.inner_lr), margin=float(config.margin),
      optimizer=config.inner_optimizer, c_edit=float(config.c_edit),
      c_loc=float(config.c_loc),
      label_smoothing=float(config.label_smoothing))
  params0 = jax.tree.map(np.asarray, classifier.params)
  objective = training.Objective(
      name=f"enn/cnn_{config.dataset}", init=lambda rng: params0,
      loss=lambda params, frozen, batch, rng: loss(params, batch),
      frozen={}, param_rules=(), frozen_rules=(),
      fingerprint=training_fingerprint(config, info))
  batch_fn = lambda step: sample_batch(train_x, train_y, k, config, step)
  valid = [sample_batch(valid_x, valid_y, k, config, i, stream=1)
           for i in range(int(config.valid_batches))]
  return objective, batch_fn, valid


__all__ = ["build", "check_config", "default_config", "load_base",
           "sample_batch", "training_fingerprint"]
