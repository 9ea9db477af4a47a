"""KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in
Language Models"): a hypernetwork that predicts, in one forward pass, the
weight update that flips a classifier's verdict on a claim.

  editor = editors.get("knowledge_editor")
  state = editor.init(checker, trained=hyper_params)      # a FactChecker
  new_params, state, info = editor.apply(checker, checker.params,
                                         {"claim": "...", "label": 1}, state)

Conditioning. The paper encodes the edit (x, y, a) with a bi-LSTM over x's
tokens. Here the condition is c = [f(x); E[y_old]; E[y_new]]: f(x) the
frozen fact checker's own pooled claim embedding (the head's input, under
the unedited weights), E a learned label embedding (old = the model's
current verdict, new = the requested one), then h = tanh(W_c c + b_c).

Update (the paper's gated update, Sec. 3.2). For each edited matrix
W ∈ R^{m×n} (kernels are stored [in, out]: m = in, n = out) a linear map of
h gives α, β ∈ R^m, γ, δ ∈ R^n and η ∈ R, and

  ΔW = s · σ(η) · (σ(α) γᵀ ⊙ ∇_W L(x, y_new) + σ(β) δᵀ)          (`gated_update`)

with s = `max_scale` and ∇_W L the gradient of the cross-entropy of the new
verdict on x at the unedited weights. With `normalize_grad` (default) ∇_W L
is divided by its Frobenius norm first, so the hypernetwork's outputs do not
have to track the gradient's scale, which differs by orders of magnitude
between the head and an encoder matrix (a deviation from the paper). The
authors' code uses a softmax where the paper has σ(α); we follow the paper.
Several requests in one `apply` get one update each, summed.

Training (`make_loss`, the paper's constrained objective, eq. 4; the data
recipe is `evaluation.fever_training.build_knowledge_editor`):

  min_φ  Σ_{x' ∈ {x} ∪ P(x)} L(θ + ΔW_φ; x', y_new)
  s.t.   KL(p_θ(·|o) ‖ p_{θ+ΔW_φ}(·|o)) ≤ m   on other claims o,

as the Lagrangian L_edit + λ (KL − m), minimised in φ and maximised in
λ = softplus(`dual_scale` · ρ) ≥ 0 (dual ascent). The one optimiser of the
shared trainer does both: the loss is written so that its value is the
Lagrangian, its gradient in φ is that of L_edit + λ·KL, and its gradient
in ρ is that of −λ(KL − m) (a gradient reversal, as the authors' code does
with a hook): λ grows while the constraint is violated and shrinks to 0
once it holds. P(x) are rewrites of x (`fever.TRAIN_RULES`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors
from keditjax.editors import base, tasks
from keditjax.models import fact_checker as fc


@dataclasses.dataclass(frozen=True)
class KnowledgeEditorHParams:
  """KnowledgeEditor.

  Attributes:
    targets: "a/b/c" paths of the 2-D weights the editor updates.
    hidden: width of the conditioning layer h.
    label_dim: width of the label embeddings.
    max_scale: s, the largest update scale.
    normalize_grad: divide ∇_W L by its Frobenius norm (see the docstring).
    margin: m, the KL budget on other claims (nats).
    dual_scale: λ = softplus(dual_scale · ρ): how fast λ moves per step of ρ.
    init_multiplier: λ at the start of training.
  """
  targets: tuple[str, ...] = ("encoder/layer_5/output/kernel", "head/kernel")
  hidden: int = 128
  label_dim: int = 16
  max_scale: float = 1.0
  normalize_grad: bool = True
  margin: float = 1e-3
  dual_scale: float = 30.0
  init_multiplier: float = 1.0

  def __post_init__(self):
    if not self.targets:
      raise errors.ConfigError("targets is empty.")
    if min(self.hidden, self.label_dim) < 1:
      raise errors.ConfigError("hidden and label_dim must be >= 1.")
    if not self.max_scale > 0 or not self.margin >= 0:
      raise errors.ConfigError(
          f"max_scale={self.max_scale} must be > 0, margin={self.margin} >= 0.")
    if not self.dual_scale > 0 or not self.init_multiplier > 0:
      raise errors.ConfigError("dual_scale and init_multiplier must be > 0.")


def _path(target: str) -> tuple[str, ...]:
  return tuple(target.split("/"))


def _name(target: str) -> str:
  return target.replace("/", ".")


def check_targets(hp: KnowledgeEditorHParams, params) -> dict:
  """`{target: (m, n)}`; raises `SiteError`/`ConfigError` on a missing or
  non-matrix leaf."""
  shapes = {}
  for target in hp.targets:
    leaf = base.get_leaf(params, _path(target))
    if np.ndim(leaf) != 2:
      raise errors.ConfigError(
          f"target {target} has shape {np.shape(leaf)}; KnowledgeEditor edits "
          "2-D weight matrices.")
    shapes[target] = tuple(np.shape(leaf))
  return shapes


def init_hypernetwork(hp: KnowledgeEditorHParams, shapes: dict, feature_dim: int,
                      num_classes: int, rng) -> dict:
  """Hypernetwork params (and the multiplier ρ) for matrices of `shapes`."""
  keys = jax.random.split(rng, 2 + len(shapes))
  cond_dim = feature_dim + 2 * hp.label_dim
  params = {
      "label_embedding": 0.1 * jax.random.normal(keys[0], (num_classes,
                                                           hp.label_dim)),
      "trunk": {"kernel": jax.random.normal(keys[1], (cond_dim, hp.hidden))
                          / np.sqrt(cond_dim),
                "bias": jnp.zeros((hp.hidden,))},
      "heads": {},
      # softplus(dual_scale · ρ) = init_multiplier
      "multiplier": jnp.asarray(np.log(np.expm1(hp.init_multiplier))
                                / hp.dual_scale, jnp.float32)}
  for key, (target, (m, n)) in zip(keys[2:], sorted(shapes.items())):
    width = 2 * m + 2 * n + 1
    params["heads"][_name(target)] = {
        "kernel": 1e-2 * jax.random.normal(key, (hp.hidden, width))
                  / np.sqrt(hp.hidden),
        "bias": jnp.zeros((width,))}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def gated_update(alpha_M, beta_M, gamma_N, delta_N, eta, grad_MxN,
                 max_scale: float = 1.0):
  """ΔW = s σ(η) (σ(α)γᵀ ⊙ ∇W + σ(β)δᵀ) (De Cao et al. 2021, Sec. 3.2)."""
  a_MxN = jax.nn.sigmoid(alpha_M)[:, None] * gamma_N[None, :]
  b_MxN = jax.nn.sigmoid(beta_M)[:, None] * delta_N[None, :]
  return max_scale * jax.nn.sigmoid(eta) * (a_MxN * grad_MxN + b_MxN)


def predict_updates(hp: KnowledgeEditorHParams, hyper, features_D, old, new,
                    grads: dict) -> dict:
  """`{target path tuple: ΔW}` for one edit (one hypernetwork pass)."""
  cond = jnp.concatenate([features_D, hyper["label_embedding"][old],
                          hyper["label_embedding"][new]])
  h = jnp.tanh(cond @ hyper["trunk"]["kernel"] + hyper["trunk"]["bias"])
  updates = {}
  for target in hp.targets:
    grad_MxN = grads[_path(target)]
    m, n = grad_MxN.shape
    head = hyper["heads"][_name(target)]
    out = h @ head["kernel"] + head["bias"]
    alpha, beta, gamma, delta = jnp.split(out[:-1], [m, 2 * m, 2 * m + n])
    if hp.normalize_grad:
      grad_MxN = grad_MxN / (jnp.linalg.norm(grad_MxN) + 1e-8)
    updates[_path(target)] = gated_update(alpha, beta, gamma, delta, out[-1],
                                          grad_MxN, hp.max_scale)
  return updates


def _edit_one(hp, config, hyper, params, x_batch, old, new):
  """ΔW for one claim (a batch of one row) at the unedited `params`."""
  paths = tuple(_path(t) for t in hp.targets)
  sub = {p: base.get_leaf(params, p) for p in paths}

  def nll(s):
    logits_1xK = fc.logits(config, tasks.merge(params, s), x_batch)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_1xK, new[None]).mean()

  grads = jax.grad(nll)(sub)
  features_D = jax.lax.stop_gradient(fc.features(config, params, x_batch)[0])
  return predict_updates(hp, hyper, features_D, old, new, grads)


def _apply_updates(params, updates):
  return tasks.merge(params, {p: base.get_leaf(params, p) + d
                              for p, d in updates.items()})


# -- training --------------------------------------------------------------

def edit_outcome(config, edited, key, x, x_mask, new, eq, eq_mask, eq_weight,
                 o_batch, logp0_KxC) -> dict:
  """One edit's losses and hits under the edited params `edited`.

  `edit`: mean cross-entropy of the new verdict over the claim and its
  weighted rewrites; `kl`: KL(p_θ(o) ‖ p_θ'(o)) over the other claims.
  """
  logits_x = fc.logits(config, edited, {key: x[None], "mask": x_mask[None]})[0]
  logits_eq = fc.logits(config, edited, {key: eq, "mask": eq_mask})
  ce_x = optax.softmax_cross_entropy_with_integer_labels(logits_x, new)
  ce_eq = optax.softmax_cross_entropy_with_integer_labels(
      logits_eq, jnp.full(eq.shape[:1], new))
  edit = (ce_x + jnp.sum(ce_eq * eq_weight)) / (1.0 + eq_weight.sum())
  logp_KxC = jax.nn.log_softmax(fc.logits(config, edited, o_batch))
  kl = jnp.mean(jnp.sum(jnp.exp(logp0_KxC) * (logp0_KxC - logp_KxC), -1))
  agree = jnp.mean(jnp.argmax(logp_KxC, -1) == jnp.argmax(logp0_KxC, -1))
  return {"edit": edit, "kl": kl, "flip": jnp.argmax(logits_x) == new,
          "eq_hits": jnp.sum((jnp.argmax(logits_eq, -1) == new) * eq_weight),
          "eq_count": eq_weight.sum(), "agree": agree}


def summarize(r: dict):
  """`(edit, kl, metrics)` over a vmapped batch of `edit_outcome`s."""
  edit, kl = r["edit"].mean(), r["kl"].mean()
  metrics = {"edit_loss": edit, "kl": kl, "flip_acc": r["flip"].mean(),
             "equiv_acc": r["eq_hits"].sum() / jnp.maximum(
                 r["eq_count"].sum(), 1.0),
             "retain_agree": r["agree"].mean()}
  # Model selection (lower is better): failed flips + changed verdicts.
  metrics["score"] = (1.0 - metrics["flip_acc"]) + (
      1.0 - metrics["retain_agree"])
  return edit, kl, metrics


def make_loss(hp: KnowledgeEditorHParams, config: fc.FactCheckerConfig,
              start: int):
  """The Lagrangian loss `(hyper, frozen, batch, rng) -> (loss, metrics)`.

  `frozen` is the fact checker's params (blocks >= `start` and the head
  suffice); `batch` holds, for E edits, `x` ([E, L, D] hidden states
  entering block `start`), `x_mask`, `old`, `new` ([E]); their rewrites
  `eq` [E, R, L', D], `eq_mask`, `eq_weight` [E, R] (0 = no rewrite); and K
  other claims `o` [K, L, D], `o_mask`.
  """
  key = fc.hidden_key(start)

  def per_edit(hyper, frozen, x, x_mask, old, new, eq, eq_mask, eq_weight,
               o_batch, logp0_KxC):
    updates = _edit_one(hp, config, hyper, frozen,
                        {key: x[None], "mask": x_mask[None]}, old, new)
    edited = _apply_updates(frozen, updates)
    return edit_outcome(config, edited, key, x, x_mask, new, eq, eq_mask,
                        eq_weight, o_batch, logp0_KxC)

  def loss(hyper, frozen, batch, rng):
    del rng  # deterministic
    o_batch = {key: batch["o"], "mask": batch["o_mask"]}
    logp0 = jax.lax.stop_gradient(
        jax.nn.log_softmax(fc.logits(config, frozen, o_batch)))
    r = jax.vmap(per_edit, in_axes=(None, None, 0, 0, 0, 0, 0, 0, 0, None,
                                    None))(
        hyper, frozen, batch["x"], batch["x_mask"], batch["old"], batch["new"],
        batch["eq"], batch["eq_mask"], batch["eq_weight"], o_batch, logp0)
    edit, kl, metrics = summarize(r)
    lam = jax.nn.softplus(hp.dual_scale * hyper["multiplier"])
    sg = jax.lax.stop_gradient
    violation = kl - hp.margin
    # Value: edit + λ·(KL − m). Gradient: φ sees edit + λ·KL, ρ sees −λ(KL − m).
    total = edit + sg(lam) * violation + (lam - sg(lam)) * sg(-violation)
    metrics.update({"lambda": lam,
                    "lagrangian": edit + sg(lam) * sg(violation)})
    return total, metrics

  return loss


# -- the editor ------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnowledgeEditorState:
  """What `init` prepares: the trained hypernetwork and the number of edits
  applied through this state (an int32 array)."""
  hyper: Any
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))


@functools.lru_cache(maxsize=8)
def _edit_fn(hp: KnowledgeEditorHParams, config):
  """The jitted batch edit for `hp` on models of `config` (cached here, not
  in the state)."""

  @jax.jit
  def edit_fn(hyper, params, batch, old_B, new_B, weight_B):
    def one(tokens, mask, old, new):
      return _edit_one(hp, config, hyper, params,
                       {"tokens": tokens[None], "mask": mask[None]}, old, new)
    per_row = jax.vmap(one)(batch["tokens"], batch["mask"], old_B, new_B)
    return {p: jnp.tensordot(weight_B, d, 1) for p, d in per_row.items()}

  return edit_fn


def knowledge_editor(hparams: KnowledgeEditorHParams = KnowledgeEditorHParams()
                     ) -> base.FunctionalEditor:
  """The KnowledgeEditor editor (see the module docstring)."""
  hp = hparams

  def init(model, params=None, *, trained=None):
    """Checks the targets against the model and keeps the hypernetwork.

    Args:
      model: a `FactChecker` (anything with `config`, `text_batch`,
        `num_classes` and `fact_checker` logits).
      params: weights to check the targets against (default `model.params`).
      trained: the trained hypernetwork params (the trainer's result for
        `fever_training.build_knowledge_editor`).

    Raises:
      ConfigError: no `trained` params, or ones for other targets/shapes.
    """
    params = model.params if params is None else params
    if trained is None:
      raise errors.ConfigError(
          "knowledge_editor needs trained=<hypernetwork params>; train them "
          "with evaluation.fever_training.build_knowledge_editor.")
    shapes = check_targets(hp, params)
    expected = jax.eval_shape(lambda: init_hypernetwork(
        hp, shapes, model.config.encoder.hidden_size, model.num_classes,
        jax.random.key(0)))
    if jax.tree.structure(expected) != jax.tree.structure(trained) or any(
        np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(trained),
                                               jax.tree.leaves(expected))):
      raise errors.ConfigError(
          "the trained hypernetwork does not match these targets/model shapes.")
    trained = jax.tree.map(jnp.asarray, trained)
    return KnowledgeEditorState(trained)

  def apply(model, params, requests, state: KnowledgeEditorState):
    """Edits `params` so that each request's claim gets its `label`."""
    timer = base.Timer()
    with timer("prepare"):
      task = tasks.TextClassifierTask(model)
      batch = task.edit_batch(requests)  # validates before any work
      edit_fn = _edit_fn(hp, model.config)
      inputs = {"tokens": batch["tokens"], "mask": batch["mask"]}
      old = model.predict(params, inputs).astype(np.int32)
      new = batch["labels"][:, 0]
      weight = batch["weights"][:, 0]
    with timer("hypernetwork"):
      updates = jax.block_until_ready(
          edit_fn(state.hyper, params, inputs, old, new, weight))
    new_leaves = {p: base.get_leaf(params, p) + d for p, d in updates.items()}
    new_params = tasks.merge(params, new_leaves)
    with timer("describe"):
      changed = base.describe_changes(params, new_leaves)
    rows = int(weight.sum())
    records = base.leaf_records("knowledge_editor",
                                base.request_items(requests), new_leaves)
    return new_params, dataclasses.replace(
        state, edits=np.asarray(int(state.edits) + rows, np.int32)), (
            base.EditInfo(changed, timer.seconds,
                          {"old": old[:rows].tolist(),
                           "new": new[:rows].tolist()}, records))

  return base.FunctionalEditor("knowledge_editor", hp, init, apply)


# -- the training recipe ---------------------------------------------------

def hparams_from_config(config) -> KnowledgeEditorHParams:
  """`KnowledgeEditorHParams` from a config's `editor` sub-dict."""
  fields = {f.name for f in dataclasses.fields(KnowledgeEditorHParams)}
  given = dict(config.get("editor", {}))
  unknown = sorted(set(given) - fields)
  if unknown:
    raise errors.ConfigError(f"config.editor has unknown fields {unknown}.")
  if "targets" in given:
    given["targets"] = tuple(given["targets"])
  return KnowledgeEditorHParams(**given)


def lowest_block(targets, num_layers: int) -> int:
  """The lowest encoder block a target is in (`num_layers` for the head).

  Raises:
    ConfigError: a target outside the encoder blocks and the head.
  """
  blocks = []
  for target in targets:
    parts = target.split("/")
    if parts[0] == "head":
      blocks.append(num_layers)
    elif (len(parts) > 2 and parts[0] == "encoder" and
          parts[1].startswith("layer_") and parts[1][6:].isdigit()):
      blocks.append(int(parts[1][6:]))
    else:
      raise errors.ConfigError(
          f"target {target!r}: only encoder blocks (encoder/layer_<l>/...) and "
          "the head can be edited.")
  return min(blocks)
