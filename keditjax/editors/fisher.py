"""The diagonal Fisher of a parameter subset over a dataset: batched,
sharded over a data mesh, with progress, cached on disk.

  fisher, n = fisher_diagonal(task, params, paths, batches, kind="empirical")

`batches` yields `(batch, real_rows)` from a task (`LanguageModelTask.
text_batches`, `ClassifierTask.data_batches`); each batch runs one jitted
step that adds the masked sum of squared per-example gradients
(`keditjax.kernels.fisher.squared_grad_sum`) to float32 accumulators.
`kind="true"` first replaces every label by one drawn from the model
(`samples` draws per example). With several devices (or a given mesh) the
batch is split over the mesh's "data" axis and XLA all-reduces the sums, so
the result equals the one-device value up to summation order.

A `cache_key` (a dict naming the dataset) stores the result under
`$KEDITJAX_CACHE/fisher` keyed by it, the subset's paths, the recipe and a
digest of every parameter; the file is checksummed and written atomically,
and a corrupt or mismatched file is recomputed (with a warning), never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from keditjax import progress as progress_lib

from keditjax import errors, sharding, stats
from keditjax.editors import base, tasks
from keditjax.kernels import fisher as fisher_kernels

KINDS = ("empirical", "true")
FORMAT = 1


def cache_dir() -> str:
  """`$KEDITJAX_CACHE/fisher`, else `~/.cache/keditjax/fisher`."""
  return os.path.join(os.path.dirname(stats.default_cache_dir()), "fisher")


def digest(data) -> str:
  """sha256 of a string, or of a pytree's paths, shapes, dtypes and bytes
  (a cache key for weights and datasets)."""
  h = hashlib.sha256()
  if isinstance(data, str):
    h.update(data.encode())
    return h.hexdigest()
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(key_path)}|{array.shape}|{array.dtype}|"
             .encode())
    h.update(array.reshape(-1).view(np.uint8))
  return h.hexdigest()


@functools.partial(jax.jit, static_argnames=("task", "paths", "kind",
                                             "chunk"))
def _step(acc, params, batch, mask_B, rng, *, task, paths, kind, chunk):
  subset = {p: base.get_leaf(params, p) for p in paths}

  def loglik(sub, example):
    one = jax.tree.map(lambda x: x[None], example)
    full = tasks.merge(params, sub)
    return tasks.log_likelihood(task.logits(full, one), one)[0]

  if kind == "true":
    labels = tasks.sample_labels(task.logits(params, batch), rng)
    batch = dict(batch, labels=labels.astype(batch["labels"].dtype))
  sums = fisher_kernels.squared_grad_sum(loglik, subset, batch, mask_B,
                                         chunk=chunk)
  return jax.tree.map(jnp.add, acc, sums)


def fisher_diagonal(task, params, paths: Sequence[tuple],
                    batches: Iterable, *, kind: str = "empirical",
                    samples: int = 1, seed: int = 0, chunk: int | None = None,
                    mesh=None, progress: bool = True, total: int | None = None,
                    cache_key: dict | None = None, use_cache: bool = True):
  """The diagonal Fisher of the `paths` leaves of `params` over `batches`.

  Args:
    task: a `keditjax.editors.tasks` task (gives `logits`).
    params: the full parameter pytree.
    paths: leaf path tuples (from `tasks.select`).
    batches: an iterable of `(batch, real_rows)`; rows past `real_rows`
      are padding and are masked out.
    kind: "empirical" (data labels) or "true" (labels sampled from the
      model; `samples` draws per example).
    samples, seed: Monte-Carlo draws and their seed (kind="true").
    chunk: examples per vmapped gradient (memory `chunk x |subset|`).
    mesh: a mesh with a "data" axis; default: all devices when there are
      several, else none.
    progress: show a tqdm bar (`total` batches, when known).
    cache_key: a JSON-able dict naming the data (enables the disk cache).
    use_cache: read/write the cache when `cache_key` is given.

  Returns:
    `({path: float32 array}, number of examples)`: F = (Σ squared
    per-example gradients) / examples.

  Raises:
    ConfigError: unknown kind, samples < 1, no data, or a batch the mesh's
      data axis does not divide.
  """
  if kind not in KINDS:
    raise errors.ConfigError(f"fisher kind {kind!r}; use one of {KINDS}.")
  if samples < 1:
    raise errors.ConfigError(f"fisher samples={samples} must be >= 1.")
  paths = tuple(sorted(tuple(p) for p in paths))
  path = None
  if cache_key is not None and use_cache:
    meta = {"format": FORMAT, "kind": kind, "samples": samples, "seed": seed,
            "paths": ["/".join(p) for p in paths], "task": task.kind,
            "data": cache_key}
    fingerprint = hashlib.sha256((json.dumps(meta, sort_keys=True) +
                                  digest(params)).encode()).hexdigest()
    path = os.path.join(cache_dir(), f"fisher-{fingerprint[:32]}.npz")
    found = stats._read_verified(path, {"fingerprint": fingerprint})
    if found is not None:
      arrays, meta_read = found
      return ({p: arrays["/".join(p)] for p in paths},
              int(meta_read["examples"]))
  if mesh is None and jax.device_count() > 1:
    mesh = sharding.make_mesh()
  if mesh is not None:
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
  acc = {p: jnp.zeros(np.shape(base.get_leaf(params, p)), jnp.float32)
         for p in paths}
  rng = jax.random.key(seed)
  count = 0
  for batch, real in progress_lib.bar(batches, total=total, desc=f"fisher ({kind})",
                          disable=not progress, leave=False):
    rows = len(batch["weights"])
    mask = (np.arange(rows) < real).astype(np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    mask = jnp.asarray(mask)
    if mesh is not None:
      data = mesh.shape["data"]
      if rows % data:
        raise errors.ConfigError(
            f"fisher batch of {rows} rows is not divisible by the mesh's "
            f"data axis ({data}); choose a batch size multiple of it.")
      batch = {k: jax.device_put(v, sharding.data_sharding(mesh, v.ndim))
               for k, v in batch.items()}
      mask = jax.device_put(mask, sharding.data_sharding(mesh, 1))
    for _ in range(samples if kind == "true" else 1):
      rng, key = jax.random.split(rng)
      acc = _step(acc, params, batch, mask, key, task=task, paths=paths,
                  kind=kind, chunk=chunk)
    count += real
  if count == 0:
    raise errors.ConfigError("the Fisher dataset is empty.")
  draws = samples if kind == "true" else 1
  result = {p: np.asarray(a) / (count * draws) for p, a in acc.items()}
  if path is not None:
    stats._write_atomic(path, {"/".join(p): a for p, a in result.items()},
                        {"fingerprint": fingerprint, "examples": count})
  return result, count
