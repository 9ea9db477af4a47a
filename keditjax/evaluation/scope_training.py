"""The recipe that trains SERAC's scope classifier from the training splits.

  params, info = scope_training.fit(encoder, scope.ScopeConfig())

Reads CounterFact train and zsRE train (never the edit splits), builds the
pairs of `keditjax.training.scope.training_pairs`, trains, and measures the
classifier on held-out training records (the last `valid` records of each
split, not used for training). `experiments/train_scope.py` writes the result
to the asset the SERAC editor loads by default.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keditjax import data, errors
from keditjax.evaluation import cases as cases_lib
from keditjax.training import scope


def load_training_cases(config: scope.ScopeConfig, *, split: str = "train",
                        valid: int = 200) -> list:
  """Cases of the training splits in `config.datasets`: their last `valid`
  records for `split="valid"`, else the first `per_dataset` of the rest
  (malformed records skipped, as the MEND recipe does)."""
  out = []
  for name in config.datasets:
    path = cases_lib.default_path(name)
    schema = name.split("-")[0]
    records = data.read_records(path)
    cut = max(len(records) - valid, 0)
    start, stop = ((cut, len(records)) if split == "valid" else
                   (0, min(config.per_dataset, cut)))
    for i in range(start, stop):
      try:
        out += cases_lib.parse_cases([records[i]], schema, where=path,
                                     start=i)
      except errors.InputError:
        continue
  return out


def measure(params, embed, cases, *, memory: int = 100) -> dict:
  """Routing quality on `cases` with their edits in one memory of `memory`.

  Returns (percent): `prompt_recall` / `paraphrase_recall` (the input goes to
  its own edit), `neighbourhood_routed` and `unrelated_routed` (a
  neighbourhood prompt is routed to any edit at all).
  """
  out = {k: [] for k in ("prompt_recall", "paraphrase_recall",
                         "neighbourhood_routed")}
  for begin in range(0, len(cases), memory):
    chunk = cases[begin:begin + memory]
    mem = embed([scope.statement(c.requests[0]) for c in chunk])
    for i, c in enumerate(chunk):
      own = lambda texts: scope.retrieve(params, embed(list(texts)), mem,
                                         0.5)
      out["prompt_recall"] += [int(j == i) for j in own([c.requests[0].text])]
      if c.paraphrase_prompts:
        out["paraphrase_recall"] += [int(j == i) for j in
                                     own(c.paraphrase_prompts)]
      if c.neighborhood:
        out["neighbourhood_routed"] += [int(j >= 0) for j in
                                        own([p for p, _ in c.neighborhood])]
  return {k: 100.0 * float(np.mean(v)) for k, v in out.items() if v}


def fit(encoder, config: scope.ScopeConfig = scope.ScopeConfig(), *,
        valid: int = 200, progress: bool = True):
  """Trains on each split's first `per_dataset` records (short of its last
  `valid`), measures on its last `valid`.

  Returns:
    (params, info): info has the config, pair count, seconds, history and
    the validation measurements before (untrained: P = I) and after.
  """
  embed = lambda t: encoder.embed(encoder.params, list(t), batch_size=64)
  cases = load_training_cases(config, valid=valid)
  anchors, queries, labels = scope.training_pairs(
      cases, random_negatives=config.random_negatives, seed=config.seed)
  params, info = scope.train(embed, anchors, queries, labels, config,
                             progress)
  checks = {}
  for name in config.datasets:
    held = load_training_cases(dataclasses.replace(config, datasets=(name,)),
                               split="valid", valid=valid)
    untrained = {k: np.asarray(v) for k, v in
                 scope.init_params(params["proj"].shape[0]).items()}
    checks[name] = {"records": len(held),
                    "untrained": measure(untrained, embed, held),
                    "trained": measure(params, embed, held)}
  return params, {"config": dataclasses.asdict(config), "pairs": info["pairs"],
                  "seconds": info["seconds"], "encoder": encoder.name,
                  "validation": checks,
                  "final_train": info["history"][-1] if info["history"] else None}


__all__ = ["fit", "load_training_cases", "measure"]
