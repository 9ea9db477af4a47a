"""The regularization family: FT, FT-L, FT+KL and EWC (survey §4.1).

Each editor fine-tunes a chosen subset of the parameters (a regex over leaf
paths, e.g. one MLP projection) on the edit examples, minimising the mean
per-request negative log-likelihood of the new target (language models:
the target tokens after the prompt; classifiers: the new label), and
differs only in what keeps the rest of the model in place:

  FT     nothing (plain fine-tuning);
  FT-L   after every optimizer step, θ is projected back onto the L∞ ball
         ‖θ − θ₀‖∞ ≤ δ around the weights the edit started from (Zhu et al.
         2020, "Modifying Memories in Transformer Models", eq. 2);
  FT+KL  + w · KL(p_θ₀(·|x) ‖ p_θ(·|x)) averaged over unrelated inputs x
         (corpus text or training images), θ₀ the weights at `init`;
  EWC    + ½ λ Σ_i F_i (θ_i − θ*_i)², F the diagonal Fisher over a named
         dataset at θ* (Kirkpatrick et al. 2017, eq. 3). `online=True`
         treats every edit as a new task whose Fisher F_e (on the edit, at
         the edited weights θ_e) joins the penalty, so successive edits
         protect the earlier ones: F ← γF + wF_e, and θ* ←
         (γFθ* + wF_eθ_e) / (γF + wF_e) (`online_anchor="mean"`: the sum of
         the per-task penalties of Kirkpatrick et al., up to a constant) or
         θ* ← θ_e (`"latest"`: Schwarz et al. 2018's online EWC).

The optimiser is any optax transformation (default Adam). The whole loop is
one jitted `lax.while_loop`: at most `steps` steps, stopping early once the
edit loss is below `stop_loss`; its per-step edit losses (and, for FT-L,
‖θ − θ₀‖∞) come back in `EditInfo.extras`.

  editor = keditjax.editors.get("ftl", radius=1e-3)
  state = editor.init(model)                  # a LanguageModel or a classifier
  new_params, state, info = editor.apply(model, model.params, requests, state)

The state holds arrays only (the KL batch and reference log-probabilities,
the Fisher and anchor keyed by "a/b/c" leaf paths, the edit count); the
jitted loop is cached outside it, by method, hyper-parameters, optimizer
and the model's type and config. `init` takes only the inputs its method
uses: `kl_inputs` (ftkl), `fisher_data`, `mesh`, `progress`, `use_cache`
(ewc).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors, stats
from keditjax.editors import base, fisher, tasks
from keditjax.kernels import fisher as fisher_kernels


@dataclasses.dataclass(frozen=True)
class FTHParams:
  """Plain fine-tuning.

  Attributes:
    params_regex: leaves whose "a/b/c" path `re.search`es this are tuned;
      None: the task's default (language models: one MLP output projection,
      `layers_4/mlp/down_proj/kernel`; classifiers: the model's
      `default_edit_regex`, else everything).
    steps: at most this many optimizer steps per `apply`.
    lr: learning rate.
    optimizer: an optax factory name taking the learning rate ("adam",
      "sgd", "adamw", ...).
    stop_loss: stop once the mean per-request NLL of the targets is below.
    stop_on: "loss" (stop at `stop_loss`) or "argmax" (stop as soon as every
      target token/label is the model's top-1 *and* the loss is below
      `stop_loss`: the smallest change that makes the edit hold).
  """
  params_regex: str | None = None
  steps: int = 25
  lr: float = 5e-4
  optimizer: str = "adam"
  stop_loss: float = 1e-2
  stop_on: str = "loss"

  def __post_init__(self):
    if self.steps < 1:
      raise errors.ConfigError(f"steps={self.steps} must be >= 1.")
    if not self.lr > 0:
      raise errors.ConfigError(f"lr={self.lr} must be > 0.")
    if not callable(getattr(optax, self.optimizer, None)):
      raise errors.ConfigError(
          f"optimizer={self.optimizer!r} is not an optax optimizer factory.")
    if self.stop_loss < 0:
      raise errors.ConfigError(f"stop_loss={self.stop_loss} must be >= 0.")
    if self.stop_on not in ("loss", "argmax"):
      raise errors.ConfigError(
          f"stop_on={self.stop_on!r}; use 'loss' or 'argmax'.")


@dataclasses.dataclass(frozen=True)
class FTLHParams(FTHParams):
  """FT with the L∞ constraint: `radius` is δ (absolute weight units)."""
  radius: float = 5e-3
  steps: int = 25
  lr: float = 5e-4

  def __post_init__(self):
    super().__post_init__()
    if not self.radius > 0:
      raise errors.ConfigError(f"radius={self.radius} must be > 0.")


@dataclasses.dataclass(frozen=True)
class FTKLHParams(FTHParams):
  """FT + KL on unrelated inputs.

  Attributes:
    kl_weight: w, the weight of the KL term.
    kl_examples: unrelated inputs (corpus rows or images) when `init` is
      not given `kl_inputs`.
    kl_length: tokens per corpus row (language models).
  """
  kl_weight: float = 100.0
  kl_examples: int = 8
  kl_length: int = 16

  def __post_init__(self):
    super().__post_init__()
    if not self.kl_weight > 0:
      raise errors.ConfigError(f"kl_weight={self.kl_weight} must be > 0.")
    if self.kl_examples < 1 or self.kl_length < 2:
      raise errors.ConfigError("kl_examples must be >= 1, kl_length >= 2.")


@dataclasses.dataclass(frozen=True)
class EWCHParams(FTHParams):
  """FT + the EWC penalty.

  Attributes:
    ewc_lambda: λ.
    fisher: "empirical" (data labels) or "true" (labels sampled from the
      model).
    fisher_samples: label draws per example for the true Fisher.
    fisher_examples: examples of the Fisher dataset (corpus rows or
      images) to use.
    fisher_length: tokens per corpus row (language models).
    fisher_batch: examples per jitted Fisher step.
    fisher_chunk: examples per vmapped per-example gradient.
    online: accumulate each edit's Fisher into the penalty (online EWC).
    online_anchor: "mean" (precision-weighted anchor: every task's penalty
      kept) or "latest" (the edited weights, Schwarz et al.).
    gamma: decay of the accumulated Fisher in online EWC.
    online_weight: weight of each edit's own Fisher in online EWC
      (F ← γF + w·F_edit). One example's squared gradient dwarfs a dataset
      mean, so w = 1 can make λF too stiff for plain SGD; lower it then.
    seed: seed of the true-Fisher label draws.
  """
  ewc_lambda: float = 1e3
  fisher: str = "empirical"
  fisher_samples: int = 1
  fisher_examples: int = 256
  fisher_length: int = 32
  fisher_batch: int = 8
  fisher_chunk: int = 8
  online: bool = False
  online_anchor: str = "mean"
  gamma: float = 1.0
  online_weight: float = 1.0
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not self.ewc_lambda > 0:
      raise errors.ConfigError(f"ewc_lambda={self.ewc_lambda} must be > 0.")
    if self.fisher not in fisher.KINDS:
      raise errors.ConfigError(
          f"fisher={self.fisher!r}; use one of {fisher.KINDS}.")
    if min(self.fisher_samples, self.fisher_examples, self.fisher_batch,
           self.fisher_chunk) < 1:
      raise errors.ConfigError(
          "fisher_samples, fisher_examples, fisher_batch and fisher_chunk "
          "must be >= 1.")
    if self.fisher_batch % self.fisher_chunk:
      raise errors.ConfigError(
          f"fisher_chunk={self.fisher_chunk} must divide fisher_batch="
          f"{self.fisher_batch}.")
    if not 0 < self.gamma <= 1:
      raise errors.ConfigError(f"gamma={self.gamma} must be in (0, 1].")
    if self.online_anchor not in ("mean", "latest"):
      raise errors.ConfigError(
          f"online_anchor={self.online_anchor!r}; use 'mean' or 'latest'.")
    if not self.online_weight > 0:
      raise errors.ConfigError(
          f"online_weight={self.online_weight} must be > 0.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FinetuneState:
  """What `init` prepares.

  Attributes:
    paths: the tuned leaves' path tuples (static).
    kl: `{"batch", "logp0"}` for FT+KL, else None.
    fisher, anchor: `{"a/b/c": array}` for EWC, else None.
    edits: edits applied so far through this state (an int32 array).
    fisher_examples: examples behind `fisher` (static).
  """
  paths: tuple = dataclasses.field(metadata=dict(static=True))
  kl: dict | None = None
  fisher: dict | None = None
  anchor: dict | None = None
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))
  fisher_examples: int = dataclasses.field(default=0,
                                           metadata=dict(static=True))


def _key(path) -> str:
  return "/".join(path)


def by_path(state: FinetuneState, field: str) -> dict:
  """`state.fisher` or `state.anchor` keyed by path tuples (the tuned
  leaves' layout)."""
  values = getattr(state, field)
  return {p: values[_key(p)] for p in state.paths}


_LOOPS: dict = {}


def cached_loop(method: str, hp, optimizer, model):
  """The jitted edit loop for `method` on models like `model`, built once.

  Keyed by the method, the hyper-parameters, the optimizer (None: the one
  `hp` names) and the model's type and config (all hashable), so a state
  never holds it.
  """
  key = (method, hp, optimizer) + tasks.model_key(model)
  if key not in _LOOPS:
    if len(_LOOPS) >= 32:
      _LOOPS.pop(next(iter(_LOOPS)))
    tx = optimizer or getattr(optax, hp.optimizer)(hp.lr)
    _LOOPS[key] = _make_loop(tasks.task_for(model), hp, tx, method)
  return _LOOPS[key]


def _kl_loss(logits_BxTxC, logp0_BxTxC, weights_BxT):
  """Mean over weighted positions of KL(p0 ‖ p)."""
  logp = jax.nn.log_softmax(logits_BxTxC.astype(jnp.float32), -1)
  kl_BxT = jnp.sum(jnp.exp(logp0_BxTxC) * (logp0_BxTxC - logp), -1)
  return jnp.sum(kl_BxT * weights_BxT) / jnp.maximum(weights_BxT.sum(), 1.0)


def edit_nll(task, params, batch, with_argmax: bool = False):
  """Mean over requests of each target's mean per-token NLL (a scalar);
  with `with_argmax`, also whether every target is the model's top-1."""
  tokens_B = batch["weights"].sum(-1)
  logits_BxTxC = task.logits(params, batch)
  nll_B = -tasks.log_likelihood(logits_BxTxC, batch)
  real_B = (tokens_B > 0).astype(jnp.float32)
  nll = jnp.sum(nll_B / jnp.maximum(tokens_B, 1.0)) / jnp.maximum(
      real_B.sum(), 1.0)
  if not with_argmax:
    return nll
  hit_BxT = jnp.argmax(logits_BxTxC, -1) == batch["labels"]
  return nll, jnp.all(hit_BxT | (batch["weights"] == 0))


def _make_loop(task, hp, optimizer, method: str):
  """The jitted edit loop: `(sub0, params, batch, extra) -> (sub, trace)`."""
  radius = getattr(hp, "radius", None)

  def loss_fn(sub, params, batch, extra):
    full = tasks.merge(params, sub)
    edit, top1 = edit_nll(task, full, batch, with_argmax=True)
    loss = edit
    if method == "ftkl":
      kl = extra["kl"]
      loss += hp.kl_weight * _kl_loss(task.logits(full, kl["batch"]),
                                      kl["logp0"], kl["batch"]["weights"])
    if method == "ewc":
      loss += fisher_kernels.ewc_penalty(sub, extra["anchor"], extra["fisher"],
                                         hp.ewc_lambda)
    return loss, (edit, top1)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def loop(sub0, params, batch, extra):
    def cond(carry):
      step, _, _, _, _, done = carry
      return (step < hp.steps) & ~done

    def body(carry):
      step, sub, opt_state, losses, linf, _ = carry
      (_, (edit, top1)), grads = grad_fn(sub, params, batch, extra)
      done = edit <= hp.stop_loss
      if hp.stop_on == "argmax":
        done = done & top1
      updates, new_state = optimizer.update(grads, opt_state, sub)
      new_sub = optax.apply_updates(sub, updates)
      if radius is not None:
        new_sub = fisher_kernels.project_linf(new_sub, sub0, radius)
      keep = lambda old, new: jax.tree.map(
          lambda o, n: jnp.where(done, o, n), old, new)
      sub, opt_state = keep(sub, new_sub), keep(opt_state, new_state)
      losses = losses.at[step].set(edit)
      linf = linf.at[step].set(fisher_kernels.linf_distance(sub, sub0))
      return step + 1, sub, opt_state, losses, linf, done

    nan = jnp.full((hp.steps,), jnp.nan, jnp.float32)
    carry = (jnp.int32(0), sub0, optimizer.init(sub0), nan, nan,
             jnp.bool_(False))
    evals, sub, _, losses, linf, done = jax.lax.while_loop(cond, body, carry)
    final = edit_nll(task, tasks.merge(params, sub), batch)
    # The iteration that finds the edit done applies no update.
    return sub, {"evals": evals, "steps": evals - done.astype(jnp.int32),
                 "losses": losses, "linf": linf, "final_loss": final}

  return loop


def _corpus_texts(data):
  """Texts of a corpus spec (None: WikiText-2) or a list of strings."""
  if data is None or isinstance(data, str):
    return stats.corpus_texts(data)
  return iter(data)


def _lm_text_batch(task, data, examples, length):
  batches = list(task.text_batches(_corpus_texts(data), length=length,
                                   examples=examples, batch_size=examples))
  if not batches:
    raise errors.ConfigError("the KL corpus gave no text.")
  return batches[0][0]


def _finetune(method: str, hparams, optimizer=None) -> base.FunctionalEditor:
  """The editor for `method` with `hparams` (see the module docstring)."""

  def prepare(model, params):
    params = model.params if params is None else params
    task = tasks.task_for(model)
    regex = hparams.params_regex or task.default_regex
    paths = tuple(sorted(tasks.select(params, regex)))
    return params, task, FinetuneState(paths)

  def init_plain(model, params=None):
    """Selects the tuned leaves (`params_regex`).

    Args:
      model: a decoder `LanguageModel` or a classifier (`logits`,
        `num_classes`, `image_shape`).
      params: the weights θ₀ (default `model.params`).

    Raises:
      ConfigError: the regex selects nothing.
    """
    return prepare(model, params)[2]

  def init_kl(model, params=None, *, kl_inputs=None):
    """Selects the tuned leaves and the KL term's reference predictions.

    Args:
      model, params: as for FT.
      kl_inputs: unrelated inputs: texts, a corpus spec (None: WikiText-2)
        for language models; an image array for classifiers.

    Raises:
      ConfigError: the regex selects nothing, or a classifier without
        `kl_inputs`.
    """
    params, task, state = prepare(model, params)
    if task.kind == "classifier":
      if kl_inputs is None:
        raise errors.ConfigError(
            "ftkl on a classifier needs kl_inputs= (unrelated images).")
      batch = task.image_batch(np.asarray(kl_inputs)[:hparams.kl_examples])
    else:
      batch = _lm_text_batch(task, kl_inputs, hparams.kl_examples,
                             hparams.kl_length)
    logp0 = jax.nn.log_softmax(task.logits(params, batch), -1)
    return dataclasses.replace(state, kl={"batch": batch, "logp0": logp0})

  def init_ewc(model, params=None, *, fisher_data=None, mesh=None,
               progress: bool = True, use_cache: bool = True):
    """Selects the tuned leaves and takes the diagonal Fisher at θ*.

    Args:
      model, params: as for FT.
      fisher_data: texts or a corpus spec (None: WikiText-2) for language
        models; `{"images", "labels"}` for classifiers.
      mesh: the Fisher computation's device mesh (default: all devices).
      progress: show a progress bar for the Fisher.
      use_cache: read/write the Fisher disk cache.

    Raises:
      ConfigError: the regex selects nothing, or a classifier without
        `fisher_data`.
    """
    params, task, state = prepare(model, params)
    paths = state.paths
    if task.kind == "classifier":
      if fisher_data is None:
        raise errors.ConfigError(
            "ewc on a classifier needs fisher_data={'images', 'labels'}.")
      batches = task.data_batches(fisher_data,
                                  batch_size=hparams.fisher_batch,
                                  examples=hparams.fisher_examples)
      key = {"images": fisher.digest(fisher_data["images"]),
             "labels": fisher.digest(fisher_data["labels"]),
             "examples": hparams.fisher_examples}
    else:
      batches = task.text_batches(_corpus_texts(fisher_data),
                                  length=hparams.fisher_length,
                                  examples=hparams.fisher_examples,
                                  batch_size=hparams.fisher_batch)
      key = {"corpus": (stats.resolve_corpus(fisher_data).identity
                        if fisher_data is None or isinstance(fisher_data, str)
                        else fisher.digest("\n".join(fisher_data))),
             "examples": hparams.fisher_examples,
             "length": hparams.fisher_length}
    total = -(-hparams.fisher_examples // hparams.fisher_batch)
    fish, count = fisher.fisher_diagonal(
        task, params, paths, batches, kind=hparams.fisher,
        samples=hparams.fisher_samples, seed=hparams.seed,
        chunk=hparams.fisher_chunk, mesh=mesh, progress=progress,
        total=total, cache_key=key, use_cache=use_cache)
    anchor = {_key(p): jnp.asarray(base.get_leaf(params, p)) for p in paths}
    return dataclasses.replace(
        state, fisher={_key(p): jnp.asarray(v) for p, v in fish.items()},
        anchor=anchor, fisher_examples=int(count))

  def apply(model, params, requests, state: FinetuneState):
    """Fine-tunes the selected leaves on `requests` (a list or one)."""
    timer = base.Timer()
    with timer("prepare"):
      task = tasks.task_for(model)
      batch = task.edit_batch(requests)  # validates before any work
      loop = cached_loop(method, hparams, optimizer, model)
      sub0 = {p: base.get_leaf(params, p) for p in state.paths}
      extra = {}
      if state.kl is not None:
        extra["kl"] = state.kl
      if state.fisher is not None:
        extra["fisher"] = by_path(state, "fisher")
        extra["anchor"] = by_path(state, "anchor")
    with timer("optimize"):
      sub, trace = loop(sub0, params, batch, extra)
      sub = jax.block_until_ready(sub)
    new_params = tasks.merge(params, sub)
    with timer("describe"):
      changed = base.describe_changes(params, sub)
    steps, evals = int(trace["steps"]), int(trace["evals"])
    extras = {"steps": steps,  # optimizer updates applied
              "losses": np.asarray(trace["losses"])[:evals].tolist(),
              "final_loss": float(trace["final_loss"])}
    if method == "ftl":
      extras["linf"] = np.asarray(trace["linf"])[:evals].tolist()
      extras["radius"] = hparams.radius
    rows = int(np.sum(np.asarray(batch["weights"]).sum(-1) > 0))
    edits = int(state.edits)
    new_state = dataclasses.replace(state,
                                    edits=np.asarray(edits + rows, np.int32))
    if method == "ewc" and hparams.online:
      with timer("fisher"):
        fish, _ = fisher.fisher_diagonal(
            task, new_params, state.paths, [(batch, rows)],
            kind=hparams.fisher, samples=hparams.fisher_samples,
            seed=hparams.seed + edits + 1, chunk=1, mesh=None,
            progress=False)
        old_fisher, old_anchor = extra["fisher"], extra["anchor"]
        old_f = {p: hparams.gamma * old_fisher[p] for p in state.paths}
        new_f = {p: hparams.online_weight * jnp.asarray(fish[p])
                 for p in state.paths}
        total = {p: old_f[p] + new_f[p] for p in state.paths}
        if hparams.online_anchor == "latest":
          anchor = dict(sub)
        else:  # Σ_k F_k (θ − θ_k)² = F (θ − Σ_k F_k θ_k / F)² + const
          anchor = {p: jnp.where(total[p] > 0, (
              old_f[p] * old_anchor[p] + new_f[p] * sub[p]) / jnp.where(
                  total[p] > 0, total[p], 1.0), old_anchor[p])
                    for p in state.paths}
        new_state = dataclasses.replace(
            new_state, fisher={_key(p): v for p, v in total.items()},
            anchor={_key(p): v for p, v in anchor.items()})
    items = base.request_items(requests)
    if task.kind == "language_model":
      items = list(base.make_requests(items))
    records = base.leaf_records(method, items, state.paths)
    return new_params, new_state, base.EditInfo(changed, timer.seconds, extras,
                                                 records)

  init = {"ftkl": init_kl, "ewc": init_ewc}.get(method, init_plain)
  return base.FunctionalEditor(method, hparams, init, apply)


def ft(hparams: FTHParams = FTHParams(), optimizer=None) -> base.FunctionalEditor:
  """Plain fine-tuning (`optimizer`: an optax transformation overriding
  `hparams.optimizer`/`lr`)."""
  return _finetune("ft", hparams, optimizer)


def ftl(hparams: FTLHParams = FTLHParams(), optimizer=None) -> base.FunctionalEditor:
  """Fine-tuning projected onto an L∞ ball (Zhu et al. 2020)."""
  return _finetune("ftl", hparams, optimizer)


def ftkl(hparams: FTKLHParams = FTKLHParams(), optimizer=None) -> base.FunctionalEditor:
  """Fine-tuning with a KL term on unrelated inputs."""
  return _finetune("ftkl", hparams, optimizer)


def ewc(hparams: EWCHParams = EWCHParams(), optimizer=None) -> base.FunctionalEditor:
  """Fine-tuning with the EWC penalty (Kirkpatrick et al. 2017)."""
  return _finetune("ewc", hparams, optimizer)
