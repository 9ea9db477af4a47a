"""Editable training (ENN; Sinitsin et al. 2020, "Editable Neural Networks").

The base model itself is meta-trained so that a few plain gradient steps on
one edit make the edit hold while the rest of its behaviour stays put. The
editor (paper §3, "gradient descent editor") is

  θ_{t+1} = θ_t − α ∇_θ l_e(θ_t),   stop once l_e(θ_t) = 0 or t = k,

with the edit loss of a classifier (§3, eq. 2, plus an optional margin m)

  l_e(θ) = max(0, m + max_{i≠y} f_i(x; θ) − f_y(x; θ))

(m = 0 is the paper's max_i log p_i − log p_y: zero iff y is the argmax),
and editable training minimises (§3, eq. 4)

  L(θ) = L_base(θ) + c_edit · l_e(θ_k) + c_loc · E_x KL(p(·|x;θ) ‖ p(·|x;θ_k)),

θ_k the result of k differentiable editor steps on an edit (x_e, y_e) drawn
from the training set, backpropagated through (a `lax.scan`). Only the leaves
matching `params_regex` are edited; the outer optimiser trains all of θ.

  objective, batch_fn, valid = enn_training.build(config)   # the trainer's
  editor = keditjax.editors.get("enn", lr=0.003, max_steps=100)
  state = editor.init(classifier)        # a cnn.Classifier (meta-trained)
  new_params, state, info = editor.apply(classifier, classifier.params,
                                         requests, state)

`meta_loss` is written against any `logits_fn(params, images) -> [B, K]`, so
the tests check it on a tiny MLP; `evaluation.enn_training.build` binds it
to the CNN and its data.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors
from keditjax.editors import base, tasks

INNER_OPTIMIZERS = ("sgd", "rmsprop")
_RMS_DECAY, _RMS_EPS = 0.9, 1e-8


# -- the editor's math (shared by meta-training and editing) ----------------

def edit_loss_rows(logits_BxK, labels_B, margin: float = 0.0):
  """l_e per row: max(0, margin + max_{i≠y} z_i − z_y) (paper eq. 2 at m=0).

  Zero iff the label beats every other class by at least `margin` logits.
  """
  num_classes = logits_BxK.shape[-1]
  onehot_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=bool)
  target_B = jnp.sum(jnp.where(onehot_BxK, logits_BxK, 0.0), -1)
  rival_B = jnp.max(jnp.where(onehot_BxK, -jnp.inf, logits_BxK), -1)
  return jax.nn.relu(margin + rival_B - target_B)


def _weighted_mean(x_B, weights_B):
  return jnp.sum(x_B * weights_B) / jnp.maximum(weights_B.sum(), 1.0)


def inner_update(sub, nu, grads, lr, kind: str):
  """One editor step on the edited leaves: SGD, or RMSProp (decay 0.9)."""
  if kind == "sgd":
    return jax.tree.map(lambda s, g: s - lr * g, sub, grads), nu
  nu = jax.tree.map(lambda v, g: _RMS_DECAY * v + (1 - _RMS_DECAY) * g * g,
                    nu, grads)
  # eps inside the root: d sqrt(v)/dv is infinite at v = 0 (meta-gradients).
  sub = jax.tree.map(lambda s, g, v: s - lr * g / jnp.sqrt(v + _RMS_EPS),
                     sub, grads, nu)
  return sub, nu


def unrolled_edit(logits_fn: Callable, params, paths: tuple, images, labels_B,
                  weights_B, *, steps: int, lr, margin: float = 0.0,
                  optimizer: str = "sgd"):
  """θ_k: `steps` differentiable editor steps on the leaves `paths`.

  A step whose starting point already satisfies the edit (weighted mean
  l_e = 0) applies no update, as the editor stops there; the stop decision
  carries no gradient.

  Args:
    logits_fn: `(params, images) -> logits [B, K]`.
    params: the full parameter pytree θ.
    paths: the edited leaves (path tuples).
    images, labels_B, weights_B: the edit rows (weight 0: padding).
    steps: k.
    lr: α (a float or a traced scalar).
    margin: m of `edit_loss_rows`.
    optimizer: "sgd" or "rmsprop".

  Returns:
    (params_k, losses_k): θ with the edited leaves replaced by θ_k, and the
    weighted mean l_e before each step, float32[k].
  """
  sub0 = {p: base.get_leaf(params, p) for p in paths}

  def edit_loss(sub):
    logits = logits_fn(tasks.merge(params, sub), images)
    return _weighted_mean(edit_loss_rows(logits, labels_B, margin), weights_B)

  def step(carry, _):
    sub, nu = carry
    loss, grads = jax.value_and_grad(edit_loss)(sub)
    new_sub, new_nu = inner_update(sub, nu, grads, lr, optimizer)
    done = loss <= 0.0
    keep = lambda old, new: jax.tree.map(
        lambda o, n: jnp.where(done, o, n), old, new)
    return (keep(sub, new_sub), keep(nu, new_nu)), loss

  nu0 = jax.tree.map(jnp.zeros_like, sub0)
  (sub, _), losses = jax.lax.scan(step, (sub0, nu0), None, length=steps)
  return tasks.merge(params, sub), losses


def flip_labels(logits_BxK, true_B, random_B, use_random_B):
  """The edit labels: a given random wrong class where `use_random_B`, else
  the runner-up (the best class other than the true one), as in the vision
  protocol's flips (`vision_data.make_cases`)."""
  onehot = jax.nn.one_hot(true_B, logits_BxK.shape[-1], dtype=bool)
  runner_up_B = jnp.argmax(jnp.where(onehot, -jnp.inf, logits_BxK), -1)
  return jnp.where(use_random_B, random_B, runner_up_B).astype(jnp.int32)


def meta_loss(logits_fn: Callable, params, batch: dict, *, paths: tuple,
              steps: int, lr: float, margin: float = 0.0,
              optimizer: str = "sgd", c_edit: float = 1.0, c_loc: float = 1.0,
              label_smoothing: float = 0.0):
  """The editable-training objective (paper eq. 4) on one batch.

  Args:
    logits_fn: `(params, images) -> logits [B, K]`.
    params: θ (every leaf is trained; only `paths` are edited).
    batch: `images` [B, ...] and `labels` [B] (L_base; their predictions at
      θ are also the KL reference of L_loc), and E edits: `edit_images`
      [E, ...], `edit_true` [E], `edit_random` [E] (a wrong class),
      `edit_use_random` [E] bool (else the runner-up is asked for).
    paths, steps, lr, margin, optimizer: the editor (`unrolled_edit`).
    c_edit, c_loc: the weights of l_e(θ_k) and of KL(p_θ ‖ p_θk).
    label_smoothing: of L_base's cross-entropy (as the base CNN was trained).

  Returns:
    (loss, metrics): metrics has `base_loss`, `edit_loss` (l_e after k
    steps), `edit_loss_before`, `edit_success` (fraction holding after k
    steps), `loc_kl`, `accuracy`.
  """
  logits_BxK = logits_fn(params, batch["images"])
  num_classes = logits_BxK.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(batch["labels"], num_classes),
                                label_smoothing)
  base_loss = optax.softmax_cross_entropy(logits_BxK, targets).mean()
  edit_logits_ExK = logits_fn(params, batch["edit_images"])
  edit_labels_E = flip_labels(jax.lax.stop_gradient(edit_logits_ExK),
                              batch["edit_true"], batch["edit_random"],
                              batch["edit_use_random"])
  logp_BxK = jax.nn.log_softmax(logits_BxK)

  def one_edit(image, label):
    params_k, losses = unrolled_edit(
        logits_fn, params, paths, image[None], label[None], jnp.ones((1,)),
        steps=steps, lr=lr, margin=margin, optimizer=optimizer)
    after = edit_loss_rows(logits_fn(params_k, image[None]), label[None],
                           margin)[0]
    logq_BxK = jax.nn.log_softmax(logits_fn(params_k, batch["images"]))
    kl = jnp.mean(jnp.sum(jnp.exp(logp_BxK) * (logp_BxK - logq_BxK), -1))
    return after, losses[0], kl

  after_E, before_E, kl_E = jax.vmap(one_edit)(batch["edit_images"],
                                               edit_labels_E)
  edit, loc = after_E.mean(), kl_E.mean()
  loss = base_loss + c_edit * edit + c_loc * loc
  metrics = {"base_loss": base_loss, "edit_loss": edit,
             "edit_loss_before": before_E.mean(),
             "edit_success": jnp.mean(after_E <= 0.0), "loc_kl": loc,
             "accuracy": jnp.mean(jnp.argmax(logits_BxK, -1) ==
                                  batch["labels"])}
  return loss, metrics


# -- the editor -------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cnn_leaf_paths() -> tuple[str, ...]:
  from keditjax.models import cnn
  abstract = jax.eval_shape(lambda: cnn.init_classifier(
      cnn.ClassifierConfig()).params)
  return tuple("/".join(str(k.key) for k in path)
               for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0])


@dataclasses.dataclass(frozen=True)
class ENNHParams:
  """The gradient-descent editor an ENN model was meta-trained for.

  Attributes:
    params_regex: edited leaves ("a/b/c" paths `re.search`ed); must select a
      leaf of the vision CNN (`conv1/kernel`, ..., `head/bias`).
    inner_steps: k, the editor steps unrolled in meta-training (recorded;
      `extras["held_within_k"]` says whether an edit needed no more).
    lr: α, the editor's step size (use the meta-training `inner_lr`).
    optimizer: "sgd" or "rmsprop" (as meta-trained).
    margin: m of the edit loss: an edit holds once its label beats every
      other class by m logits.
    max_steps: at most this many steps per `apply` (stops when it holds).
  """
  params_regex: str = "dense1/kernel"
  inner_steps: int = 5
  lr: float = 0.003
  optimizer: str = "sgd"
  margin: float = 0.0
  max_steps: int = 100

  def __post_init__(self):
    if self.inner_steps < 1:
      raise errors.ConfigError(f"inner_steps={self.inner_steps} must be >= 1.")
    if self.max_steps < 1:
      raise errors.ConfigError(f"max_steps={self.max_steps} must be >= 1.")
    if not self.lr > 0:
      raise errors.ConfigError(f"lr={self.lr} must be > 0.")
    if self.optimizer not in INNER_OPTIMIZERS:
      raise errors.ConfigError(f"optimizer={self.optimizer!r}; use one of "
                               f"{INNER_OPTIMIZERS}.")
    if self.margin < 0:
      raise errors.ConfigError(f"margin={self.margin} must be >= 0.")
    try:
      pattern = re.compile(self.params_regex)
    except (re.error, TypeError) as e:
      raise errors.ConfigError(
          f"params_regex={self.params_regex!r} is not a regex: {e}.")
    if not any(pattern.search(p) for p in _cnn_leaf_paths()):
      raise errors.ConfigError(
          f"params_regex={self.params_regex!r} selects no CNN leaf; leaves: "
          f"{list(_cnn_leaf_paths())}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ENNState:
  """paths: the edited leaves (static); edits: edits applied so far through
  this state (an int32 array). The jitted editor is cached by `_loop`."""
  paths: tuple = dataclasses.field(metadata=dict(static=True))
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))


_LOOPS: dict = {}


def _loop(hp: ENNHParams, model):
  """`_make_loop` for `hp` on models like `model`, built once per
  (hyper-parameters, model type, config)."""
  key = (hp,) + tasks.model_key(model)
  if key not in _LOOPS:
    if len(_LOOPS) >= 16:
      _LOOPS.pop(next(iter(_LOOPS)))
    _LOOPS[key] = _make_loop(tasks.task_for(model), hp)
  return _LOOPS[key]


def _make_loop(task, hp: ENNHParams):
  """The jitted editor: `(params, batch) -> (sub, trace)`, a `while_loop`
  of `inner_update` steps until l_e = 0 or `max_steps`."""
  logits_fn = lambda p, x: task.model.logits(p, x)

  def edit_loss(sub, params, batch):
    logits = logits_fn(tasks.merge(params, sub), batch["images"])
    return _weighted_mean(edit_loss_rows(logits, batch["labels"][:, 0],
                                         hp.margin), batch["weights"][:, 0])

  grad_fn = jax.value_and_grad(edit_loss)

  @functools.partial(jax.jit, static_argnums=2)
  def loop(params, batch, paths):
    sub0 = {p: base.get_leaf(params, p) for p in paths}

    def cond(carry):
      step, _, _, _, done = carry
      return (step < hp.max_steps) & ~done

    def body(carry):
      step, sub, nu, losses, _ = carry
      loss, grads = grad_fn(sub, params, batch)
      done = loss <= 0.0
      new_sub, new_nu = inner_update(sub, nu, grads, hp.lr, hp.optimizer)
      keep = lambda old, new: jax.tree.map(
          lambda o, n: jnp.where(done, o, n), old, new)
      return (step + 1, keep(sub, new_sub), keep(nu, new_nu),
              losses.at[step].set(loss), done)

    losses = jnp.full((hp.max_steps,), jnp.nan, jnp.float32)
    carry = (jnp.int32(0), sub0, jax.tree.map(jnp.zeros_like, sub0), losses,
             jnp.bool_(False))
    evals, sub, _, losses, done = jax.lax.while_loop(cond, body, carry)
    final = edit_loss(sub, params, batch)
    return sub, {"evals": evals, "steps": evals - done.astype(jnp.int32),
                 "losses": losses, "final_loss": final, "held": final <= 0.0}

  return loop


def enn(hparams: ENNHParams = ENNHParams()) -> base.FunctionalEditor:
  """The ENN editor: `hparams.max_steps` at most of the meta-trained
  gradient-descent editor on the `params_regex` leaves of a classifier."""

  def init(model, params=None):
    """Selects the edited leaves of a classifier (a `cnn.Classifier`).

    Raises:
      ConfigError: not a classifier, or the regex selects no leaf.
    """
    params = model.params if params is None else params
    task = tasks.task_for(model)
    if task.kind != "classifier":
      raise errors.ConfigError(
          f"enn edits image classifiers; got a {task.kind}.")
    paths = tuple(sorted(tasks.select(params, hparams.params_regex)))
    return ENNState(paths)

  def apply(model, params, requests, state: ENNState):
    """Runs the editor on `requests` (`.image`, `.label`; a list or one)."""
    timer = base.Timer()
    with timer("prepare"):
      task = tasks.task_for(model)
      batch = task.edit_batch(requests)  # validates before any work
      loop = _loop(hparams, model)
    with timer("optimize"):
      sub, trace = loop(params, batch, state.paths)
      sub = jax.block_until_ready(sub)
    new_params = tasks.merge(params, sub)
    with timer("describe"):
      changed = base.describe_changes(params, sub)
    steps, evals = int(trace["steps"]), int(trace["evals"])
    extras = {"steps": steps,
              "losses": np.asarray(trace["losses"])[:evals].tolist(),
              "final_loss": float(trace["final_loss"]),
              "held": bool(trace["held"]),
              "held_within_k": bool(trace["held"]) and
                               steps <= hparams.inner_steps}
    rows = int(np.sum(np.asarray(batch["weights"]).sum(-1) > 0))
    new_state = dataclasses.replace(
        state, edits=np.asarray(int(state.edits) + rows, np.int32))
    records = base.leaf_records("enn", base.request_items(requests),
                                state.paths)
    return new_params, new_state, base.EditInfo(changed, timer.seconds, extras,
                                                 records)

  return base.FunctionalEditor("enn", hparams, init, apply)


__all__ = ["ENNHParams", "ENNState", "INNER_OPTIMIZERS", "edit_loss_rows",
           "enn", "flip_labels", "inner_update", "meta_loss", "unrolled_edit"]
