"""One generic trainer for hypernetworks and meta-trained models.

An `Objective` says what is trained; `train` runs it the same way on one CPU,
on an N-device mesh and on several hosts:

  objective = Objective(name, init, loss, frozen, param_rules, frozen_rules,
                        fingerprint)
  result = train(objective, config, batch_fn=batch_fn, valid_batches=valid,
                 workdir=DIR)

- `loss(params, frozen, batch, rng) -> (loss, metrics)` is pure. The one
  `train_step(state, frozen, batch)` is `jax.jit`ted with explicit
  in/out shardings and `donate_argnums=0`: trainable params (and, by
  propagation, their optimizer moments) follow `param_rules`, the frozen
  inputs (a base model) `frozen_rules`, and every batch is split over the
  mesh's "data" axis. XLA inserts the collectives, so the code is identical
  on 1 and N devices, and on N hosts after `jax.distributed.initialize`.
- The batch of step `s` is `batch_fn(s)` and the step's rng is
  `fold_in(key(seed), s)`: training is a deterministic function of the step
  number, which is what makes resuming after a kill exact.
- Every `checkpoint_every` steps the state (and the best params so far, and
  the early-stopping counters) goes to an orbax checkpoint in `workdir`;
  a later call with the same workdir resumes from the newest one.
- Every `eval_every` steps the loss's metrics are averaged over
  `valid_batches`; with `patience > 0`, training stops after `patience`
  evaluations without improving `early_stop_metric`, and the result carries
  the best params.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from keditjax import progress

from keditjax import errors, sharding
from keditjax.training import checkpoint as ckpt_lib
from keditjax.training import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class Objective:
  """What `train` optimises (see the module docstring).

  Attributes:
    name: recorded in checkpoints; a checkpoint of another name is refused.
    init: `rng -> params`, the trainable pytree.
    loss: `(params, frozen, batch, rng) -> (scalar, {name: scalar})`.
    frozen: constants the loss reads (a base model's params); not trained.
    param_rules: `(regex, PartitionSpec)` placement of trainable leaves.
    frozen_rules: the same for `frozen` (`sharding.DEFAULT_RULES` for LMs).
    fingerprint: what this trains against (base weights, data recipe);
      resuming from a checkpoint with another fingerprint is refused.
  """
  name: str
  init: Callable[[jax.Array], Any]
  loss: Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
  frozen: Any = None
  param_rules: tuple = ()
  frozen_rules: tuple = ()
  fingerprint: str = ""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  best: Any  # params at the best validation so far


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    params: host (numpy) params at the best validation step, else the last.
    history: every metrics row logged (train and valid), oldest first.
    best_step: the step whose params are returned.
    steps: the number of steps the state has taken.
    stopped_early: whether patience ran out.
    resumed_from: the checkpoint step this call started from, or None.
    seconds: {"compile": first step incl. compilation, "steady": per step}.
    state: the final on-device `TrainState`.
    mesh: the mesh it ran on.
  """
  params: Any
  history: list
  best_step: int
  steps: int
  stopped_early: bool
  resumed_from: int | None
  seconds: dict
  state: TrainState
  mesh: Any


OPTIMIZERS = ("adam", "adamw", "sgd")


def default_config() -> ml_collections.ConfigDict:
  """The trainer's fields and defaults (a config's `train` sub-dict)."""
  c = ml_collections.ConfigDict()
  c.steps = 200
  c.optimizer = "adam"
  c.learning_rate = 1e-4
  c.weight_decay = 0.0
  c.warmup_steps = 0
  c.grad_clip = 1.0  # global-norm clipping; 0 disables it
  c.seed = 0
  c.log_every = 10
  c.eval_every = 50
  c.patience = 0  # evaluations without improvement before stopping; 0: never
  c.early_stop_metric = "loss"  # lower is better
  c.checkpoint_every = 50
  c.keep = 3
  c.resume = True
  c.mesh_data = 0  # 0: every device the model axis leaves
  c.mesh_model = 1
  c.progress = True
  c.tensorboard = True
  return c


def check_config(config, defaults=None, where: str = "config") -> None:
  """Refuses fields `defaults` does not have, recursively.

  Raises:
    UnsupportedConfigError: naming the unknown field and the valid ones.
  """
  defaults = default_config() if defaults is None else defaults
  for key in config.keys():
    if key not in defaults:
      raise errors.UnsupportedConfigError(
          f"unknown config field {where}.{key}; valid fields of {where}: "
          f"{sorted(defaults.keys())}.")
    value, default = config[key], defaults[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise errors.ConfigError(f"{where}.{key} must be a ConfigDict.")
      check_config(value, default, f"{where}.{key}")


def _check_train_config(c) -> None:
  check_config(c, default_config(), "train")
  positive = ("steps", "log_every", "eval_every", "checkpoint_every", "keep")
  for key in positive:
    if int(c[key]) < 1:
      raise errors.ConfigError(f"train.{key}={c[key]} must be >= 1.")
  if c.optimizer not in OPTIMIZERS:
    raise errors.ConfigError(
        f"train.optimizer={c.optimizer!r}; choose one of {OPTIMIZERS}.")
  if not c.learning_rate > 0:
    raise errors.ConfigError(
        f"train.learning_rate={c.learning_rate} must be > 0.")
  if c.patience < 0 or c.warmup_steps < 0 or c.grad_clip < 0:
    raise errors.ConfigError(
        "train.patience, train.warmup_steps and train.grad_clip must be >= 0.")


def make_optimizer(c) -> optax.GradientTransformation:
  """Clipping, then Adam/AdamW/SGD with an optional linear warmup."""
  lr = c.learning_rate
  if c.warmup_steps:
    lr = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
  if c.optimizer == "adam":
    tx = optax.adam(lr)
  elif c.optimizer == "adamw":
    tx = optax.adamw(lr, weight_decay=c.weight_decay)
  else:
    tx = optax.sgd(lr)
  return optax.chain(optax.clip_by_global_norm(c.grad_clip), tx) if (
      c.grad_clip) else tx


def _global(tree, shardings):
  """Host arrays (the same on every process) as global arrays."""
  def one(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def host(tree):
  """A (possibly multi-host) array pytree as numpy arrays on every process."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def _check_batch(batch, mesh) -> None:
  if not isinstance(batch, Mapping) or not jax.tree.leaves(batch):
    raise errors.InputError(
        f"batch_fn must return a non-empty dict of arrays; got {type(batch)}.")
  data = mesh.shape["data"]
  for key_path, value in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = np.shape(value)
    if not shape or shape[0] % data:
      raise errors.ShardingError(
          f"batch{jax.tree_util.keystr(key_path)} has shape {shape}; its "
          "first (batch) dimension must be a multiple of the mesh's data "
          f"axis ({data}).")


def _mesh(c, mesh):
  if mesh is not None:
    return mesh
  return sharding.make_mesh(None if c.mesh_data <= 0 else c.mesh_data,
                            c.mesh_model)


def train(objective: Objective, config, *, batch_fn: Callable[[int], dict],
          valid_batches=None, workdir: str | None = None, mesh=None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Trains `objective` (module docstring); resumes from `workdir`.

  Args:
    objective: what to train.
    config: a `default_config()`-shaped ConfigDict (a method config's
      `train`), already overridden from the command line.
    batch_fn: `step -> batch`, fixed shapes, batch first, deterministic.
    valid_batches: batches for validation (None: no validation).
    workdir: where checkpoints and `metrics.jsonl` go (None: neither).
    mesh: a `("data", "model")` mesh; default from `mesh_data/mesh_model`.
    on_step: called as `on_step(step, metrics)` after every step on every
      process (tests use it to stop a run).

  Returns:
    A `TrainResult`.

  Raises:
    ConfigError / UnsupportedConfigError: bad config (before any work).
    CheckpointError: the workdir holds another objective's or a corrupt
      checkpoint.
  """
  c = config
  _check_train_config(c)
  mesh = _mesh(c, mesh)
  _check_batch(batch_fn(0), mesh)
  valid_batches = list(valid_batches or [])
  for batch in valid_batches:
    _check_batch(batch, mesh)
  tx = make_optimizer(c)
  key = jax.random.key(c.seed)
  replicated = NamedSharding(mesh, P())

  shapes = jax.eval_shape(objective.init, key)
  param_sh = sharding.param_shardings(shapes, mesh, objective.param_rules)
  frozen = {} if objective.frozen is None else objective.frozen
  frozen = _global(frozen, sharding.param_shardings(
      frozen, mesh, objective.frozen_rules))
  params = jax.jit(objective.init, out_shardings=param_sh)(key)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=param_sh)
  # Optimizer moments sit like their params; counters are replicated.
  opt_sh = optax.tree_map_params(
      tx, lambda _, sh: sh, jax.eval_shape(tx.init, shapes), param_sh,
      transform_non_params=lambda _: replicated)
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
      params=params, opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
      best=copy(params))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = lambda b: jax.tree.map(
      lambda x: sharding.data_sharding(mesh, np.ndim(x)), b)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(key, state.step)
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state, state.best), metrics

  example = batch_sh(batch_fn(0))
  step_fn = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, example),
                    out_shardings=(state_sh, replicated), donate_argnums=0)

  def eval_step(params, frozen, batch):
    loss, metrics = objective.loss(params, frozen, batch,
                                   jax.random.fold_in(key, 2**31 - 1))
    return dict(metrics, loss=loss)
  eval_fn = jax.jit(eval_step, out_shardings=replicated)

  meta = {"name": objective.name, "fingerprint": objective.fingerprint,
          "best_step": 0, "best_value": None, "bad_evals": 0,
          "stopped_early": False}
  checkpointer, resumed_from = None, None
  if workdir is not None:
    checkpointer = ckpt_lib.Checkpointer(
        f"{workdir}/checkpoints", every=c.checkpoint_every, keep=c.keep)
    latest = checkpointer.latest_step() if c.resume else None
    if latest is not None:
      state, saved = checkpointer.restore(
          latest, ckpt_lib.abstract(state),
          expect={"name": objective.name,
                  "fingerprint": objective.fingerprint})
      meta.update({k: saved[k] for k in meta if k in saved})
      resumed_from = latest
  log = (metrics_lib.MetricsLog(workdir, resume_step=resumed_from or 0,
                                tensorboard=c.tensorboard)
         if workdir is not None else None)
  history = []

  def record(step, split, values):
    row = {"step": int(step), "split": split}
    row.update({k: float(v) for k, v in host(values).items()})
    history.append(row)
    if log is not None:
      log.write(step, split, {k: v for k, v in row.items()
                              if k not in ("step", "split")})

  def validate(step):
    rows = [host(eval_fn(state.params, frozen, _global(b, batch_sh(b))))
            for b in valid_batches]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    record(step, "valid", mean)
    if c.early_stop_metric not in mean:
      raise errors.ConfigError(
          f"train.early_stop_metric={c.early_stop_metric!r} is not a metric "
          f"of this objective; it reports {sorted(mean)}.")
    return mean[c.early_stop_metric]

  start = int(host(state.step))
  seconds = {"compile": None, "steady": None}
  stopped = bool(meta["stopped_early"])
  bar = progress.bar(total=c.steps, initial=start, desc=objective.name,
             disable=not c.progress or jax.process_index() != 0)
  steady_start, steady_steps = None, 0
  step = start
  while step < c.steps and not stopped:
    t0 = time.perf_counter()
    batch = batch_fn(step)
    state, metrics = step_fn(state, frozen, _global(batch, batch_sh(batch)))
    step += 1
    if step == start + 1:
      jax.block_until_ready(state.params)
      seconds["compile"] = time.perf_counter() - t0
      steady_start = time.perf_counter()
    else:
      steady_steps += 1
    if step % c.log_every == 0 or step == c.steps:
      record(step, "train", metrics)
      bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
    if valid_batches and (step % c.eval_every == 0 or step == c.steps):
      value = validate(step)
      if meta["best_value"] is None or value < meta["best_value"]:
        meta.update(best_value=value, best_step=step, bad_evals=0)
        state = dataclasses.replace(state, best=copy(state.params))
      else:
        meta["bad_evals"] += 1
        stopped = bool(c.patience) and meta["bad_evals"] >= c.patience
        meta["stopped_early"] = stopped
    if checkpointer is not None:
      checkpointer.save(step, state, dict(meta),
                        force=stopped or step == c.steps)
    bar.update(1)
    if on_step is not None:
      on_step(step, metrics)
  bar.close()
  if steady_start is not None and steady_steps:
    jax.block_until_ready(state.params)
    seconds["steady"] = (time.perf_counter() - steady_start) / steady_steps
  if log is not None:
    log.close()
  if checkpointer is not None:
    checkpointer.close()
  best = state.best if valid_batches else state.params
  return TrainResult(
      params=host(best), history=history,
      best_step=int(meta["best_step"]) if valid_batches else step,
      steps=step, stopped_early=stopped, resumed_from=resumed_from,
      seconds=seconds, state=state, mesh=mesh)


__all__ = ["Objective", "OPTIMIZERS", "TrainResult", "TrainState",
           "check_config", "default_config", "host", "make_optimizer",
           "train"]
