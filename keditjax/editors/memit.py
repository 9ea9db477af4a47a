"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023).

Thousands of facts at once, spread over a range of MLP layers:

  1. for each request, the target residual z = h_L + δ at the subject's
     last token after the last layer L of the range (δ optimised as ROME's
     v*, MEMIT eq. 16), all requests batched in one jitted loop;
  2. for each layer l of the range, bottom to top: the keys K at l (averaged
     within each context type, then across types, as the reference does:
     `key_weighting`) and the residuals still missing at L, divided by
     the number of layers left; then ΔW_l = (λC_l + KᵀK)⁻¹ Kᵀ R (eq. 14), and
     the next layer sees the edited model.

λ (`mom2_update_weight`) balances new facts against preserved keys. Its
scale grows with the MLP width, so by default λ = `lambda_per_unit` × F
(F = intermediate size) with 0.5: 768 for SmolLM2-135M (8,192 for GPT-J,
whose paper value is 15,000; the reference framework's default 15,000
barely edits SmolLM2). On 200 CounterFact records (one batch) λ = 700 and
1,000 both give 98.5 / 90.5 / 70.5-71.5, λ = 1,536 98.5 / 87.5 / 69.5.

z is optimised until the target NLL is below `v_stop_loss` = 1e-2 (ROME's
5e-2 stops earlier and generalises less: paraphrase 89.0 instead of 90.5 at
λ = 700-1,000), at the price of more steps (most requests use all 25).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base, compute
from keditjax.editors.rome import load_covariance
from keditjax.kernels import linalg


@dataclasses.dataclass(frozen=True)
class MemitHParams:
  """MEMIT hyper-parameters (the paper's names in brackets).

  Attributes:
    layers: the edited blocks; z is placed after the last [layers].
    context_lengths: generated context prefixes (MEMIT: 5 of 10 tokens).
    v_*, kl_factor, clamp_norm_factor: the z optimisation (ROME's v*).
    v_chunk: requests per jitted z batch (slots of the pool).
    v_continuous: continuous batching of the z optimisation: a slot whose
      request stops takes the next waiting request, instead of idling until
      the slowest request of its chunk stops (same z per request, fewer
      steps; `compute.optimize_values`).
    mom2_update_weight: λ; None for `lambda_per_unit` × F.
    lambda_per_unit: λ per MLP unit when `mom2_update_weight` is None.
    mom2_tokens, mom2_corpus, mom2_dtype: the key covariance C (see ROME).
    seed: seed of the context templates.
    key_weighting: how a request's key averages its contexts. "per_type"
      (the MEMIT reference): the mean within each context type (the bare
      prompt; each `context_lengths` group), then the mean over types, so
      the bare prompt weighs 1/(1 + len(context_lengths)), ½ by default.
      "flat": one mean over every template (the bare prompt 1/6 by
      default; what keditjax did before 2026-12-04, kept for comparison).
  """
  layers: tuple = (3, 4, 5, 6, 7)
  context_lengths: tuple = ((10, 5),)
  v_steps: int = 25
  v_lr: float = 0.5
  v_weight_decay: float = 1e-3
  kl_factor: float = 0.0625
  clamp_norm_factor: float = 4.0
  v_stop_loss: float = 1e-2
  v_stop_on: str = "nll"
  v_compute_dtype: str = "auto"
  v_scan_layers: bool = True
  v_chunk: int = 8
  v_continuous: bool = True
  mom2_update_weight: float | None = None
  lambda_per_unit: float = 0.5
  mom2_tokens: int = 200_000
  mom2_corpus: str | None = None
  mom2_dtype: str = "float32"
  seed: int = 0
  key_weighting: str = "per_type"

  def __post_init__(self):
    if self.key_weighting not in ("per_type", "flat"):
      raise errors.ConfigError(
          f"key_weighting={self.key_weighting!r}: use 'per_type' or 'flat'.")

  def value_hparams(self) -> compute.ValueHParams:
    return compute.value_hparams(self)

  def lam(self, intermediate_size: int) -> float:
    if self.mom2_update_weight is not None:
      return float(self.mom2_update_weight)
    return self.lambda_per_unit * intermediate_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemitState:
  """Templates and per-layer key covariances.

  Attributes:
    templates: the context templates (static).
    layers: the edited layers, sorted (static).
    covariance: {str(layer): C_l `[F, F]`}.
  """
  templates: tuple = dataclasses.field(metadata=dict(static=True))
  layers: tuple = dataclasses.field(metadata=dict(static=True))
  covariance: dict = dataclasses.field(default_factory=dict)


def validate(model, requests):
  requests = base.make_requests(requests)
  for request in requests:
    compute.encode_target(model.tokenizer, request)
    compute.tokenize_around_subject(model.tokenizer, request.prompt,
                                    request.subject)
  return requests


def init_state(model, params, hparams, covariance, templates) -> MemitState:
  params = model.params if params is None else params
  layers = base.check_layers(hparams.layers, model.config.num_layers,
                             "layers")
  for layer in layers:
    model.site_param(f"layer/{layer}/mlp/value")
  cov = load_covariance(model, params, list(layers), hparams, covariance)
  if templates is None:
    templates = compute.context_templates(
        model, params, hparams.context_lengths, seed=hparams.seed)
  return MemitState(tuple(templates), tuple(sorted(layers)),
                    {str(l): c for l, c in cov.items()})


def template_weights(n_templates: int, context_lengths, key_weighting:
                     str = "per_type") -> np.ndarray:
  """Each template's weight in a request's key (MemitHParams.key_weighting).

  Templates are the bare prompt first, then the `context_lengths` groups in
  order (`compute.context_templates`). Templates given by hand that do not
  add up to those groups count as two types: the first (bare) and the rest.
  """
  if key_weighting == "flat" or n_templates == 1:
    return np.full((n_templates,), 1.0 / n_templates)
  groups = [1] + [int(count) for _, count in context_lengths]
  if sum(groups) != n_templates:
    groups = [1, n_templates - 1]
  return np.concatenate([np.full((c,), 1.0 / (len(groups) * c))
                         for c in groups])


def spread_update(model, params, requests, state, hparams, solve, factor,
                  method: str):
  """MEMIT's layer-by-layer spreading with a pluggable per-layer solve.

  Args:
    solve: `(layer, keys_NxF, residuals_NxD, w_FxD) -> ΔW` for one layer.
    factor: `(layer, keys_NxF) -> X_FxN` with `solve(...) = X @ R` (the
      records' factors; ΔW itself is `solve`'s, unchanged).
    method: the editor's name (for the records).

  Returns:
    (new params, EditInfo, {layer: keys_NxF}).
  """
  layers = tuple(sorted(hparams.layers))
  last = layers[-1]
  timer = base.Timer()
  with timer("value"):
    values = compute.optimize_values(
        model, params, requests, state.templates, layer=last,
        site_kind="resid", hp=hparams.value_hparams(),
        chunk=hparams.v_chunk, continuous=hparams.v_continuous)
  new_params = params
  updates, keys_by_layer = {}, {}
  touched = [[] for _ in requests]
  n_templates = len(state.templates)
  weights_T = template_weights(n_templates, hparams.context_lengths,
                               hparams.key_weighting)
  rows = [compute.tokenize_around_subject(model.tokenizer, compute.fill(t, r),
                                          r.subject)
          for r in requests for t in state.templates]
  # Keys over every context; z on the bare prompt (template 0) only.
  with timer("key"):
    keys_stream = compute.RowStream(model, rows)
    z_stream = compute.RowStream(model, rows[::n_templates])
  for i, layer in enumerate(layers):
    with timer("key"):
      key_site, z_site = f"layer/{layer}/mlp/key", f"layer/{last}/resid"
      for stream in (keys_stream, z_stream):
        stream.advance(new_params, layer)
      keys_NxF = keys_stream.peek(new_params, layer + 1, [key_site])[key_site]
      keys_NxTxF = keys_NxF.reshape(len(requests), n_templates, -1)
      if hparams.key_weighting == "flat":
        keys_NxF = keys_NxTxF.mean(1)  # bit for bit the earlier behaviour
      else:
        keys_NxF = jnp.einsum("ntf,t->nf", keys_NxTxF,
                              jnp.asarray(weights_T, keys_NxF.dtype))
      cur_z = z_stream.peek(new_params, last + 1, [z_site])[z_site]
      if i == 0:
        # z = the unedited z plus δ, both in float32 (the δ loop may have
        # run its matmuls in bfloat16; its own z is then slightly off).
        target_z = cur_z + values["delta"]
      residuals_NxD = (target_z - cur_z) / (len(layers) - i)
    with timer("update"):
      path = model.site_param(f"layer/{layer}/mlp/value")
      w_FxD = base.get_leaf(new_params, path)
      delta = solve(layer, jnp.asarray(keys_NxF, jnp.float32),
                    jnp.asarray(residuals_NxD, jnp.float32), w_FxD)
      new_w = w_FxD + delta.astype(w_FxD.dtype)
      new_w.block_until_ready()
      new_params = base.replace_leaves(new_params, {path: new_w})
      updates[path] = new_w
      keys_by_layer[layer] = keys_NxF
    with timer("records"):
      x_FxN = np.asarray(factor(layer, jnp.asarray(keys_NxF, jnp.float32)),
                         np.float32)
      r_NxD = np.asarray(residuals_NxD, np.float32)
      for j in range(len(requests)):
        touched[j].append(base.LeafDelta(
            path, (x_FxN[:, j:j + 1].copy(), r_NxD[j:j + 1].copy())))
  info = base.EditInfo(
      changed=base.describe_changes(params, updates),
      seconds=timer.seconds,
      extras={"steps": values["steps"].tolist(),
              "loss": values["loss"].tolist(),
              "nll": values["nll"].tolist(),
              "delta_norm": np.linalg.norm(values["delta"], axis=-1).tolist()},
      records=base.make_records(method, requests, [tuple(t) for t in touched]))
  return new_params, info, keys_by_layer


def memit(hparams: MemitHParams = MemitHParams()) -> base.FunctionalEditor:
  """The MEMIT editor for `hparams` (see the module docstring)."""

  def init(model, params=None, *, covariance=None, templates=None):
    """Context templates and the key covariance of every edited layer.

    Args:
      model: a `LanguageModel`.
      params: parameters for the statistics (default the model's).
      covariance: {layer: [F, F]} to use instead of computing.
      templates: context templates to use instead of generating them.
    """
    return init_state(model, params, hparams, covariance, templates)

  def apply(model, params, requests, state: MemitState):
    """Writes every request in one batch (non-successive within the call)."""
    requests = validate(model, requests)
    lam = hparams.lam(model.config.intermediate_size)

    def solve(layer, keys, residuals, w):
      del w
      return linalg.memit_update(
          keys, residuals,
          jnp.asarray(state.covariance[str(layer)], jnp.float32), lam)

    def factor(layer, keys):
      return linalg.memit_factor(
          keys, jnp.asarray(state.covariance[str(layer)], jnp.float32), lam)

    new_params, info, _ = spread_update(model, params, requests, state,
                                        hparams, solve, factor, "memit")
    info.extras["lambda"] = lam
    return new_params, state, info

  return base.FunctionalEditor("memit", hparams, init, apply)
