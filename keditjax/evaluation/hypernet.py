"""Training recipes for hypernetwork and meta-trained editors.

`build(config)` turns a `train_hypernet` config into what the generic
trainer needs: `Recipe(objective, batch_fn, valid_batches, finish)`.
`config.method` picks the recipe; "mend" lives here, the others in
`fever_training` (knowledge_editor, mend_classifier) and `enn_training`
(enn). The editors hold the math; the recipes bind it to data.

MEND data: `config.data` is "synthetic" (an invented world, for tests and
the notebook) or a "+"-joined list of bundled edit datasets (keditjax.data),
e.g. "zsre+counterfact": their *train* files (`zsre-train`,
`counterfact-train`), `num_train` records in all (split evenly), each an
`(edit, paraphrase, neighbourhood)` triple. A fixed-seed `num_valid` of them
is held out for validation.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from keditjax import data, errors, sharding, training
from keditjax.editors import fisher, hypernet_data, mend
from keditjax.evaluation import cases as cases_lib

# method -> (module, its default-config function, its recipe function)
EXTERNAL = {
    "knowledge_editor": ("keditjax.evaluation.fever_training",
                         "knowledge_editor_config", "build_knowledge_editor"),
    "mend_classifier": ("keditjax.evaluation.fever_training",
                        "mend_classifier_config", "build_mend_classifier"),
    "enn": ("keditjax.evaluation.enn_training", "default_config", "build")}


def _external(method: str, which: int):
  module, *names = EXTERNAL[method]
  return getattr(importlib.import_module(module), names[which])


@dataclasses.dataclass
class Recipe:
  objective: training.Objective
  batch_fn: Callable[[int], dict]
  valid_batches: list
  finish: Callable[[Any, str], dict] | None = None


def mend_config() -> ml_collections.ConfigDict:
  """Every field of a MEND config, with the defaults."""
  c = ml_collections.ConfigDict()
  c.method = "mend"
  c.model = "smollm2-135m"  # a keditjax.models.load spec, "tiny", "tiny-gpt2"
  c.data = "zsre+counterfact"
  c.num_train = 2000
  c.num_valid = 64
  c.batch_size = 8  # edits per step
  c.joint = False  # True: a step's edits are applied as one (batch editing)
  c.init_from = ""  # a workdir with a trained editor to start from ("": random)
  c.length = 32  # tokens per row
  c.targets = 4  # target tokens per row
  c.edit_weight = 1.0
  c.loc_weight = 1.0
  c.loc_per_edit = 1  # locality pairs per edit (CounterFact neighbours)
  c.norm_examples = 64
  c.mend = ml_collections.ConfigDict(
      {"layers": (), "rank": 128, "init_lr": 1e-4})
  c.train = training.default_config()
  return c


def defaults(method: str) -> ml_collections.ConfigDict:
  """The default config of `method` (for unknown-field checks)."""
  if method == "mend":
    return mend_config()
  if method in EXTERNAL:
    return _external(method, 0)()
  raise errors.ConfigError(
      f"config.method={method!r}; available: {['mend', *EXTERNAL]}.")


def check(config) -> None:
  """Refuses unknown fields anywhere in `config` (before any work)."""
  if "method" not in config:
    raise errors.ConfigError("the config has no `method` field.")
  training.check_config(config, defaults(config.method), "config")


def load_model(spec: str):
  """`models.load(spec)`; "tiny" / "tiny-gpt2": a random tiny Llama / GPT-2."""
  if spec in ("tiny", "tiny-gpt2"):
    from keditjax.models import tiny  # pylint: disable=import-outside-toplevel
    return tiny.tiny_lm(arch="gpt2" if spec == "tiny-gpt2" else "llama",
                        embed_std=0.25)
  from keditjax import models  # pylint: disable=import-outside-toplevel
  return models.load(spec)


def mend_triples(c, model) -> list:
  """Training triples that fit `c.length` / `c.targets`."""
  if c.data == "synthetic":
    triples = hypernet_data.synthetic_triples(2 * (c.num_train + c.num_valid),
                                              seed=c.train.seed)
  else:
    names = c.data.split("+")
    per = -(-(c.num_train + c.num_valid) * 2 // len(names))
    triples = []
    for name in names:
      if name not in ("zsre", "counterfact"):
        raise errors.ConfigError(
            f"config.data names {name!r}; use 'synthetic' or a '+'-list of "
            "'zsre', 'counterfact'.")
      path = cases_lib.default_path(name + "-train")
      records = data.read_records(path)[:per]
      cases, skipped = [], 0
      for i, record in enumerate(records):
        try:  # a few training records are malformed (an empty answer)
          cases += cases_lib.parse_cases([record], name, where=path, start=i)
        except errors.InputError:
          skipped += 1
      if skipped > len(records) // 10:
        raise errors.InputError(
            f"{skipped} of {len(records)} records of {path} are malformed.")
      triples += hypernet_data.triples_from_cases(cases)
  triples = hypernet_data.with_locality(triples, c.loc_per_edit)
  ok = [t for t in triples
        if all(hypernet_data.fits(model, pair, c.length, c.targets)
               for pair in t)]
  need = c.num_train + c.num_valid
  if len(ok) < need:
    raise errors.InputError(
        f"only {len(ok)} of {len(triples)} triples fit length={c.length}, "
        f"targets={c.targets}; need num_train + num_valid = {need}.")
  order = np.random.RandomState(c.train.seed).permutation(len(ok))
  return [ok[i] for i in order[:need]]


def _row_sets(model, triples, c, start_layer, cache: str | None):
  """Row sets "edit", "para", "loc" (with a `[N, loc_per_edit]` lead when
  loc_per_edit > 1), each with its prefix activations `hidden`."""
  k = len(triples[0]) - 2
  sets = {}
  parts = {"edit": [t[0] for t in triples], "para": [t[1] for t in triples],
           "loc": [pair for t in triples for pair in t[2:]]}
  for part, pairs in parts.items():
    rows = hypernet_data.rows(model, pairs, length=c.length,
                              targets=c.targets)
    path = None if cache is None else f"{cache}-{part}.npy"
    if path and os.path.exists(path):
      rows["hidden"] = np.load(path)
    else:
      rows["hidden"] = hypernet_data.prefix_hidden(
          model, model.params, rows, start_layer,
          progress=c.train.progress)
      if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", rows["hidden"])
        os.replace(path + ".tmp.npy", path)
    if part == "loc" and k > 1:
      rows = {f: v.reshape((len(triples), k) + v.shape[1:])
              for f, v in rows.items()}
    sets[part] = rows
  return sets


def _norm(model, sets, layers, start_layer, count: int) -> dict:
  """Per-layer mean/std of `[x; δ]` over the first `count` edits' tokens."""
  config = model.config
  run = jax.jit(lambda p, r: mend.factors(config, p, r, layers, start_layer))
  rows = {k: v[:count] for k, v in sets["edit"].items()}
  means, stds = [], []
  for x, d, m in run(model.params, rows):
    z = np.concatenate([np.asarray(x), np.asarray(d)], -1).reshape(
        -1, x.shape[-1] + d.shape[-1])[np.asarray(m).reshape(-1) > 0]
    std = z.std(0)
    means.append(z.mean(0))
    stds.append(np.maximum(std, 1e-3 * std.mean() + 1e-12))
  return {"mean": np.stack(means).astype(np.float32),
          "std": np.stack(stds).astype(np.float32)}


def build_mend(c) -> Recipe:
  """MEND on `c.model`, trained on `c.data` (module docstring)."""
  model = load_model(c.model)
  hp = mend.MendHParams(layers=tuple(c.mend.layers) or None, rank=c.mend.rank,
                        init_lr=c.mend.init_lr)
  layers = mend.check_hparams(hp, model.config)
  start = min(layers)
  triples = mend_triples(c, model)
  weights = fisher.digest(model.params)
  data_key = fisher.digest(repr((triples, c.length, c.targets)))
  cache = None
  if not c.model.startswith("tiny"):
    cache = os.path.join(fisher.cache_dir(), "..", "hypernet",
                         f"{weights[:16]}-{data_key[:16]}-L{start}")
  sets = _row_sets(model, triples, c, start, cache)
  norm = _norm(model, sets, layers, start, c.norm_examples)
  n_train = c.num_train
  train = {k: {f: v[:n_train] for f, v in rows.items()}
           for k, rows in sets.items()}
  valid = {k: {f: v[n_train:] for f, v in rows.items()}
           for k, rows in sets.items()}
  cfg = model.config
  shapes = dict(num_layers=len(layers), in_dim=cfg.intermediate_size,
                out_dim=cfg.hidden_size, rank=c.mend.rank,
                init_lr=c.mend.init_lr)
  loss = functools.partial(mend.objective_loss, config=cfg, layers=layers,
                           start_layer=start, edit_weight=c.edit_weight,
                           loc_weight=c.loc_weight, joint=c.joint)
  model_rules = (
      (r"^w1$", jax.sharding.PartitionSpec(None, "model")),
      (r"^w2$", jax.sharding.PartitionSpec("model", None)))
  fingerprint = fisher.digest(repr((weights, data_key, layers, c.mend.rank,
                                    c.edit_weight, c.loc_weight, c.joint)))
  init = functools.partial(mend.init_net, **shapes)
  if c.init_from:  # continue from a trained network (and its statistics)
    start_net, norm, meta = mend.load(c.init_from, cfg)
    if tuple(meta["layers"]) != tuple(layers) or meta["rank"] != c.mend.rank:
      raise errors.ConfigError(
          f"init_from={c.init_from!r} edits layers {meta['layers']} with rank "
          f"{meta['rank']}; this config has {list(layers)}, {c.mend.rank}.")
    init = lambda rng: jax.tree.map(jnp.asarray, start_net)
    fingerprint = fisher.digest(repr((fingerprint, meta["fingerprint"],
                                      meta["best_step"])))
  objective = training.Objective(
      name=f"mend/{c.model}/{c.data}",
      init=init, loss=loss,
      frozen={"lm": model.params, "norm": norm}, param_rules=model_rules,
      frozen_rules=sharding.DEFAULT_RULES, fingerprint=fingerprint)
  b = c.batch_size

  def take(split, idx):
    return {k: {f: v[idx] for f, v in rows.items()}
            for k, rows in split.items()}

  def batch_fn(step: int) -> dict:
    per_epoch = n_train // b
    epoch, i = divmod(step, per_epoch)
    order = np.random.RandomState([c.train.seed, epoch]).permutation(n_train)
    return take(train, order[i * b:(i + 1) * b])

  n_valid = (c.num_valid // b) * b
  valid_batches = [take(valid, np.arange(s, s + b))
                   for s in range(0, n_valid, b)]

  def finish(result, workdir: str) -> dict:
    meta = {"method": "mend", "model": c.model, "arch": cfg.arch,
            "layers": list(layers),
            "rank": c.mend.rank, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_layers, "fingerprint": fingerprint,
            "best_step": result.best_step}
    mend.export(workdir, result.params, norm, meta)
    return meta

  if n_train < b:
    raise errors.ConfigError(
        f"num_train={n_train} is smaller than batch_size={b}.")
  return Recipe(objective, batch_fn, valid_batches, finish)


def build(config) -> Recipe:
  """The recipe of `config.method` (config checked first)."""
  check(config)
  if config.method == "mend":
    return build_mend(config)
  return Recipe(*_external(config.method, 1)(config))


__all__ = ["Recipe", "build", "build_mend", "check", "defaults",
           "mend_config"]
