"""SERAC's scope classifier: is an input within the scope of an edit?

Mitchell et al. (ICML 2022), §3: an edit memory of edit descriptors z_e and a
classifier g(z_e, x) ∈ [0, 1]; the embedding variant scores a pair by a
learned scale on the distance of their embeddings. Here

  e(t)          = all-MiniLM-L6-v2 sentence embedding (frozen, unit norm)
  z(t)          = normalise(P e(t))                    P: learned [E, E], from I
  logit(x, e)   = s · (z(x) · z(e)) + b                s, b: learned scalars

so a cosine similarity in a learned projection, scaled and shifted; in scope
when sigmoid(logit) > threshold. P is what lets the classifier learn that the
*subject* decides scope: CounterFact's neighbourhood prompts share an edit's
relation and wording but not its subject, and they are the hard negatives.

Training pairs come from the *training* splits (CounterFact train, zsRE
train; never the edit splits): per record, the edit statement (prompt filled
with the subject + the new target) against its own prompt and paraphrases
(positives), its neighbourhood prompts (hard negatives: same relation, other
subject) and another record's prompt (random negatives). Binary
cross-entropy, the shared trainer (`training.train`) and Adam.
`load_or_train` caches the result on disk by a digest of its settings and
data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.training import trainer


@dataclasses.dataclass(frozen=True)
class ScopeConfig:
  """How the scope classifier is trained.

  Attributes:
    datasets: training splits ("counterfact-train", "zsre-train").
    per_dataset: records used from each.
    steps, batch_size, lr, seed: the trainer's settings.
    random_negatives: random (other-record) negatives per record.
  """
  datasets: tuple = ("counterfact-train", "zsre-train")
  per_dataset: int = 2000
  steps: int = 600
  batch_size: int = 128
  lr: float = 1e-3
  seed: int = 0
  random_negatives: int = 2

  def __post_init__(self):
    if self.per_dataset < 1 or self.steps < 1 or self.batch_size < 2:
      raise errors.ConfigError(
          "scope classifier: per_dataset, steps >= 1 and batch_size >= 2 "
          f"needed; got {self.per_dataset}, {self.steps}, {self.batch_size}.")
    if not self.lr > 0:
      raise errors.ConfigError(f"scope classifier lr={self.lr} must be > 0.")
    for name in self.datasets:
      if name not in ("counterfact-train", "zsre-train"):
        raise errors.ConfigError(
            f"scope classifier dataset {name!r}; use counterfact-train or "
            "zsre-train (training splits only).")


def init_params(dim: int) -> dict:
  """P = I, s = 10, b = -6 (so the untrained classifier says "in scope"
  above a cosine of 0.6, near where frozen MiniLM separates paraphrases from
  neighbours)."""
  return {"proj": jnp.eye(dim, dtype=jnp.float32),
          "scale": jnp.float32(10.0), "bias": jnp.float32(-6.0)}


def project(params, e_NxE):
  """z = normalise(P e): the classifier's view of sentence embeddings."""
  z = jnp.asarray(e_NxE, jnp.float32) @ params["proj"]
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def logits(params, query_NxE, memory_CxE):
  """logit(x_n, e_c) for every query and memory entry: `[N, C]`."""
  return (params["scale"] * project(params, query_NxE)
          @ project(params, memory_CxE).T + params["bias"])


def pair_logits(params, a_BxE, b_BxE):
  """logit for each row's pair: `[B]`."""
  return params["scale"] * jnp.sum(
      project(params, a_BxE) * project(params, b_BxE), -1) + params["bias"]


def retrieve(params, query_NxE, memory_CxE, threshold: float = 0.5,
             active_C=None) -> np.ndarray:
  """SERAC's retrieval: per query, the memory entry with the highest
  in-scope probability if it exceeds `threshold`, else -1 (out of scope).

  Ties (the same edit stored twice, or two conflicting edits of one fact)
  go to the later entry, so a newer edit overrides an older one.

  Args:
    params: the classifier.
    query_NxE, memory_CxE: unit sentence embeddings.
    threshold: the in-scope probability needed.
    active_C: optional 0/1 mask of live entries.

  Returns:
    int `[N]` entry indices, -1 where out of scope.
  """
  query_NxE = np.atleast_2d(np.asarray(query_NxE, np.float32))
  if np.ndim(memory_CxE) != 2 or np.shape(memory_CxE)[0] == 0:
    return np.full((len(query_NxE),), -1, np.int64)
  z_NxC = np.asarray(logits(params, query_NxE, memory_CxE))
  if active_C is not None:
    z_NxC = np.where(np.asarray(active_C)[None] > 0, z_NxC, -np.inf)
  # argmax of the reversed columns: the last of equal maxima.
  c = z_NxC.shape[1]
  best_N = c - 1 - np.argmax(z_NxC[:, ::-1], axis=1)
  z_N = z_NxC[np.arange(len(best_N)), best_N]
  prob_N = 1.0 / (1.0 + np.exp(-np.clip(z_N, -60, 60)))
  return np.where(np.isfinite(z_N) & (prob_N > threshold), best_N, -1)


def statement(request) -> str:
  """The edit descriptor kept in SERAC's memory: the filled prompt followed
  by the new target ("The Eiffel Tower is located in Rome")."""
  return request.text + request.target_new


def training_pairs(cases, *, random_negatives: int = 2, seed: int = 0):
  """(anchor texts, query texts, labels) from training cases (module
  docstring)."""
  rng = np.random.default_rng(seed)
  anchors, queries, labels = [], [], []
  prompts = [c.requests[0].text for c in cases]

  def add(anchor, query, label):
    anchors.append(anchor)
    queries.append(query)
    labels.append(label)

  for i, case in enumerate(cases):
    anchor = statement(case.requests[0])
    add(anchor, prompts[i], 1.0)
    for p in case.paraphrase_prompts:
      add(anchor, p, 1.0)
    for p, _ in case.neighborhood:
      add(anchor, p, 0.0)
    for j in rng.choice(len(cases), size=random_negatives, replace=False):
      if j != i:
        add(anchor, prompts[j], 0.0)
  return anchors, queries, np.asarray(labels, np.float32)


def _loss(params, frozen, batch, rng):
  del frozen, rng
  z = pair_logits(params, batch["anchor"], batch["query"])
  y = batch["label"]
  # Positives and negatives weigh the same whatever their counts.
  w = jnp.where(y > 0, 0.5 / jnp.maximum(y.sum(), 1.0),
                0.5 / jnp.maximum((1 - y).sum(), 1.0))
  bce = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
  correct = ((z > 0) == (y > 0)).astype(jnp.float32)
  return jnp.sum(w * bce), {"loss": jnp.sum(w * bce),
                            "accuracy": jnp.mean(correct)}


def train(embed, anchors, queries, labels, config: ScopeConfig,
          progress: bool = False):
  """Trains the classifier on embedded pairs.

  Args:
    embed: `texts -> [N, E]` unit sentence embeddings.
    anchors, queries, labels: the pairs (`training_pairs`).
    config: a `ScopeConfig`.
    progress: show the trainer's bar.

  Returns:
    (params as numpy, {"history", "seconds", "pairs"}).
  """
  texts = sorted(set(anchors) | set(queries))
  index = {t: i for i, t in enumerate(texts)}
  e_NxE = np.asarray(embed(texts), np.float32)
  a = e_NxE[[index[t] for t in anchors]]
  q = e_NxE[[index[t] for t in queries]]
  n = len(labels)

  def batch_fn(step):
    rows = np.random.default_rng([config.seed, step]).choice(
        n, size=config.batch_size, replace=n < config.batch_size)
    return {"anchor": a[rows], "query": q[rows], "label": labels[rows]}

  c = trainer.default_config()
  c.steps, c.learning_rate, c.seed = config.steps, config.lr, config.seed
  c.eval_every, c.checkpoint_every, c.log_every = (config.steps,
                                                    config.steps, 50)
  c.progress, c.tensorboard, c.grad_clip = progress, False, 0.0
  objective = trainer.Objective(
      name="serac-scope", init=lambda _: init_params(e_NxE.shape[1]),
      loss=_loss, fingerprint="serac-scope")
  start = time.perf_counter()
  result = trainer.train(objective, c, batch_fn=batch_fn)
  params = jax.tree.map(np.asarray, result.params)
  return params, {"history": result.history, "pairs": n,
                  "seconds": time.perf_counter() - start}


def save(path: str, params, info: dict) -> None:
  """Writes params as `path` (.npz) and `info` beside it (.json), atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in params.items()})
  os.replace(tmp, path)
  with open(path[:-4] + ".json", "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)


def load(path: str) -> dict:
  """Params written by `save`.

  Raises:
    CheckpointError: missing or unreadable file, or other leaves.
  """
  try:
    with np.load(path) as f:
      params = {k: np.asarray(f[k], np.float32) for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(
        f"scope classifier {path} is missing or unreadable ({e}).") from e
  if sorted(params) != ["bias", "proj", "scale"] or params["proj"].ndim != 2:
    raise errors.CheckpointError(
        f"{path} is not a scope classifier (leaves {sorted(params)}).")
  return params


__all__ = ["ScopeConfig", "init_params", "load", "logits", "retrieve", "save",
           "pair_logits", "project", "statement", "train", "training_pairs"]
