"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022).

A fact "subject -> object" is read out by the MLP of one early-middle block
at the subject's last token. ROME treats that MLP output projection W as a
linear associative memory `v = k W` and rewrites one association:

  1. k*: the key at the subject's last token, averaged over the prompt in
     short self-generated contexts (eq. 3);
  2. v*: the value that makes the model say the new target: a delta at the
     MLP output optimised for the target's likelihood, with a KL term that
     keeps "{subject} is a" unchanged and weight decay (eq. 4);
  3. the rank-one ΔW = C⁻¹k* (v* − k*W)ᵀ / (k*ᵀC⁻¹k*) that maps k* to v*
     while disturbing other keys (second moment C) least (eq. 2).

`use_covariance=False` replaces C by the identity (EasyEdit's default
`mom2_adjustment=False`).

  editor = rome(RomeHParams(layer=4))
  state = editor.init(model)
  new_params, state, info = editor.apply(model, model.params, request, state)

Each request's record holds its rank-one factors: u = C⁻¹k*/(k*ᵀC⁻¹k*)
`[F, 1]` and v = v* − k*W `[1, D]`, W the kernel before that request.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base, compute
from keditjax.kernels import linalg
from keditjax.kernels.covariance import check_covariance


@dataclasses.dataclass(frozen=True)
class RomeHParams:
  """ROME hyper-parameters (the paper's names in brackets).

  Attributes:
    layer: the block whose MLP output projection is rewritten [layers].
    context_lengths: (tokens, count) pairs of generated context prefixes
      [context_template_length_params].
    v_steps, v_lr, v_weight_decay, kl_factor, clamp_norm_factor,
    v_stop_loss, v_stop_on, v_compute_dtype, v_scan_layers: the v*
      optimisation (see `compute.ValueHParams`).
    use_covariance: use the key second moment C [mom2_adjustment]; False
      uses the identity.
    mom2_tokens: corpus tokens for C [mom2_n_samples, in tokens].
    mom2_corpus: corpus for C (None: the bundled WikiText-2; any
      `keditjax.data` corpus name, path or hf: spec).
    mom2_dtype: accumulator dtype, "float32" or "float64".
    seed: seed of the context templates.
  """
  layer: int = 4
  context_lengths: tuple = ((5, 10), (10, 10))
  v_steps: int = 25
  v_lr: float = 0.5
  v_weight_decay: float = 1e-3
  kl_factor: float = 0.0625
  clamp_norm_factor: float = 4.0
  v_stop_loss: float = 5e-2
  v_stop_on: str = "nll"
  v_compute_dtype: str = "auto"
  v_scan_layers: bool = True
  use_covariance: bool = True
  mom2_tokens: int = 200_000
  mom2_corpus: str | None = None
  mom2_dtype: str = "float32"
  seed: int = 0

  def value_hparams(self) -> compute.ValueHParams:
    return compute.value_hparams(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RomeState:
  """What ROME precomputes once per model.

  Attributes:
    templates: the context templates (static).
    covariance: C `[F, F]` (float64), or None for the identity.
  """
  templates: tuple = dataclasses.field(metadata=dict(static=True))
  covariance: np.ndarray | None = None


def stats_placement(model) -> dict:
  """`keditjax.stats` arguments that keep a sharded model's layout.

  A `sharding.ShardedLanguageModel` has its `mesh`: the statistics run on
  it (weights where the model's rules put them, batches over "data",
  `batch_size` rounded up to a multiple of the data axis) instead of the
  default all-devices data mesh, which would replicate every weight.
  """
  mesh = getattr(model, "mesh", None)
  if mesh is None:
    return {}
  from keditjax import stats
  data = mesh.shape["data"]
  return {"mesh": mesh,
          "batch_size": -(-stats.DEFAULT_BATCH_SIZE // data) * data}


def load_covariance(model, params, layers, hp, covariance=None, *,
                    rcond: float = 0.0) -> dict:
  """C for each layer: the one given, or from `keditjax.stats` (cached).

  Each is checked (finite, symmetric, PSD and, when `rcond > 0`, not
  singular) before any editing work.
  """
  if covariance is not None:
    if not isinstance(covariance, dict):
      covariance = {layers[0]: covariance}
    missing = [l for l in layers if l not in covariance]
    if missing:
      raise errors.InputError(f"no covariance given for layers {missing}.")
  else:
    from keditjax import stats
    covariance = stats.second_moments(
        model, layers, params=params, corpus=hp.mom2_corpus,
        num_tokens=hp.mom2_tokens, dtype=hp.mom2_dtype,
        **stats_placement(model))
  f = model.config.intermediate_size
  out = {}
  for layer in layers:
    cov = np.asarray(covariance[layer], np.float64)
    if cov.shape != (f, f):
      raise errors.InputError(
          f"covariance for layer {layer} has shape {cov.shape}; expected "
          f"({f}, {f}) (intermediate_size).")
    out[layer] = check_covariance(
        cov, f"the layer/{layer}/mlp/key covariance", rcond=rcond)
  return out


def rome(hparams: RomeHParams = RomeHParams()) -> base.FunctionalEditor:
  """The ROME editor for `hparams` (see the module docstring)."""

  def init(model, params=None, *, covariance=None, templates=None):
    """Context templates and (unless disabled) the key covariance.

    Args:
      model: a `LanguageModel`.
      params: parameters to compute statistics with (default the model's).
      covariance: `[F, F]` (or {layer: [F, F]}) to use instead of computing.
      templates: context templates to use instead of generating them.
    """
    params = model.params if params is None else params
    base.check_layers([hparams.layer], model.config.num_layers, "layer")
    model.site_param(f"layer/{hparams.layer}/mlp/value")
    cov = None
    if hparams.use_covariance:
      # C⁻¹k* needs an invertible C; real key statistics are
      # ill-conditioned (λ_min/λ_max ~ 1e-6), so only refuse what float32
      # cannot tell from singular.
      cov = load_covariance(model, params, [hparams.layer], hparams,
                            covariance, rcond=1e-7)[hparams.layer]
    if templates is None:
      templates = compute.context_templates(
          model, params, hparams.context_lengths, seed=hparams.seed)
    return RomeState(tuple(templates), cov)

  def apply(model, params, requests, state: RomeState):
    """Applies each request in turn (each on top of the previous one)."""
    layer = hparams.layer
    requests = base.make_requests(requests)
    hparams.value_hparams()  # refuses bad v_* fields before any work
    for request in requests:  # validate everything before any work
      compute.value_rows(model, [request], state.templates)  # fits the context
    path = model.site_param(f"layer/{layer}/mlp/value")
    timer = base.Timer()
    new_params = params
    extras = {"steps": [], "loss": [], "nll": [], "delta_norm": []}
    touched = []
    for request in requests:
      with timer("key"):
        key = compute.subject_keys(model, new_params, [request],
                                   state.templates,
                                   [f"layer/{layer}/mlp/key"])
        key_F = key[f"layer/{layer}/mlp/key"][0].astype(np.float64)
        cinv_key_F = (key_F if state.covariance is None else
                      np.linalg.solve(state.covariance, key_F))
      with timer("value"):
        values = compute.optimize_values(
            model, new_params, [request], state.templates, layer=layer,
            site_kind="mlp/value", hp=hparams.value_hparams())
      with timer("update"):
        w_FxD = base.get_leaf(new_params, path)
        delta_D = values["delta"][0]
        # v* = k*W + δ: the delta is what the edit adds to the value.
        value_D = key_F.astype(np.float32) @ np.asarray(w_FxD) + delta_D
        args = (w_FxD, jnp.asarray(key_F, w_FxD.dtype),
                jnp.asarray(value_D, w_FxD.dtype),
                jnp.asarray(cinv_key_F, w_FxD.dtype))
        update = linalg.rank_one_update(*args)
        new_w = w_FxD + update.astype(w_FxD.dtype)
        new_params = base.replace_leaves(new_params, {path: new_w})
        new_w.block_until_ready()
        u_Fx1, v_1xD = linalg.rank_one_factors(*args)
        touched.append((base.LeafDelta(path, (
            np.asarray(u_Fx1, np.float32), np.asarray(v_1xD, np.float32))),))
      for k in ("steps", "loss", "nll"):
        extras[k].append(values[k][0].item())
      extras["delta_norm"].append(float(np.linalg.norm(delta_D)))
    info = base.EditInfo(
        changed=base.describe_changes(params, {path: base.get_leaf(
            new_params, path)}),
        seconds=timer.seconds, extras=extras,
        records=base.make_records("rome", requests, touched))
    return new_params, state, info

  return base.FunctionalEditor("rome", hparams, init, apply)
