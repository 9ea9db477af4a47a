"""UltraEdit: lifelong editing in closed form (Gu et al. 2025).

Per turn (one `apply` with a batch of requests), for every edited linear
layer `y = x W` (here the MLP output projection of each of `layers`, whose
input and output are the named sites `layer/ℓ/mlp/key` and
`layer/ℓ/mlp/value`, as in MEND):

  1. one forward/backward pass of the current model on the requests'
     `prompt + target` rows gives, at every token `t` kept (`tokens`), the
     layer input `k_t` and the gradient of the target NLL w.r.t. its output,
     `g_t = ∂L/∂y_t` (no hooks: a capture and the gradient of a zero patch);
  2. the *lifelong normaliser*: running per-dimension mean and variance of
     `z_t = [k_t; g_t]` over every token of every turn so far (this turn's
     included) are updated (Chan et al.'s parallel combination, exact), and
     `ẑ_t = (z_t − μ) / (σ + ε)` splits into `(k̂_t, ĝ_t)`;
  3. target value shifts `v_t = −lr · ‖k̂_t‖² · ĝ_t`;
  4. the ridge regression from the raw keys to those shifts,
     `ΔW = (Kᵀ K + λ I)⁻¹ Kᵀ V`, is added to `W`.

No per-request optimisation loop: one forward/backward and one `F × F` solve
per layer, whatever the batch size. The normaliser's statistics are the
editor state carried from turn to turn (and saved with `state_io`).

Each request's record declares its share of every `ΔW` as factors: since
`(Kᵀ K + λ I)⁻¹ Kᵀ = Kᵀ (K Kᵀ + λ I)⁻¹`, `ΔW = Σ_j K_jᵀ A_j` with
`A = (K Kᵀ + λ I)⁻¹ V` split by request (`factored`). A manifest then stores
`F × n + n × D` numbers per request and layer (n its tokens) instead of the
dense `F × D` change, and one request of a batch can be subtracted. A call
with so many tokens that the factors would be larger records no factors.

Differences from the reference implementation (XiaojieGu/UltraEdit, also
EasyEdit's port), stated so they can be checked:
  - the reference keeps one normaliser per weight *shape*, so all edited
    layers of the same shape share statistics; here each layer has its own
    (its keys and gradients have their own scales);
  - the reference adds `n_b · var_unbiased(batch)` to its sum of squares,
    which over-counts each batch's spread by `n_b / (n_b − 1)`; here the sum
    of squared deviations is exact, so `σ` equals the standard deviation
    (ddof 1) of all features seen (tests/test_ultraedit.py checks both);
  - padding tokens never enter the statistics or the solve (the reference
    pads to `editor_batch_size` and truncates after normalising).

  editor = ultraedit(UltraEditHParams(layers=(26, 27, 28)))
  state = editor.init(model)
  new_params, state, info = editor.apply(model, model.params, requests, state)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base, mend

TOKENS = ("all", "answer")


@dataclasses.dataclass(frozen=True)
class UltraEditHParams:
  """UltraEdit's hyper-parameters (defaults chosen for SmolLM2-135M by the
  sweep in RESULTS.md, "UltraEdit").

  Attributes:
    layers: edited blocks (their MLP output projection); None: the last
      three.
    lr: the step `lr` in `v_t = −lr · ‖k̂_t‖² · ĝ_t`.
    ridge: `λ` of the ridge regression (the reference uses 1).
    tokens: "all" (every token of prompt + target, the reference's
      `token: mask`) or "answer" (the positions that predict target tokens).
    eps: added to `σ` when normalising.
  """
  layers: tuple | None = (23, 24, 25, 26, 27)
  lr: float = 1e-4
  ridge: float = 1.0
  tokens: str = "all"
  eps: float = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UltraEditState:
  """The lifelong normaliser of every edited layer.

  Attributes:
    count: tokens seen per layer `[layers]` (float32).
    mean: running mean of `[k; g]`, `[layers, F + D]`.
    m2: running sum of squared deviations, `[layers, F + D]`.
    layers: the edited blocks (static).
    edits: `apply` calls so far (an int32 array).
  """
  count: Any
  mean: Any
  m2: Any
  layers: tuple = dataclasses.field(metadata=dict(static=True))
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))


# -- the math (pure; tests/test_ultraedit.py checks it against NumPy) -------

def update_stats(count, mean, m2, z_NxC, w_N):
  """Running (count, mean, sum of squared deviations) after rows `z` with
  0/1 weights `w` (Chan, Golub & LeVeque's pairwise update)."""
  w_N = w_N.astype(jnp.float32)
  n_b = w_N.sum()
  safe = jnp.maximum(n_b, 1.0)
  mean_b = (z_NxC * w_N[:, None]).sum(0) / safe
  m2_b = (((z_NxC - mean_b) ** 2) * w_N[:, None]).sum(0)
  n = count + n_b
  delta = mean_b - mean
  new_mean = mean + delta * (n_b / jnp.maximum(n, 1.0))
  new_m2 = m2 + m2_b + delta ** 2 * (count * n_b / jnp.maximum(n, 1.0))
  return n, new_mean, new_m2


def normalize(z_NxC, count, mean, m2, eps):
  """`(z − μ) / (σ + eps)`, σ the standard deviation with ddof 1."""
  std = jnp.sqrt(m2 / jnp.maximum(count - 1.0, 1.0))
  return (z_NxC - mean) / (std + eps)


def shift_targets(kh_NxF, gh_NxD, w_N, lr):
  """The rows' targets `v_t = −lr ‖k̂_t‖² ĝ_t`, weighted."""
  w_N = w_N.astype(jnp.float32)[:, None]
  return -lr * jnp.sum(kh_NxF ** 2, -1, keepdims=True) * gh_NxD * w_N


def _solve(kw_NxF, v_NxD, ridge):
  """`(Kᵀ K + λ I)⁻¹ Kᵀ V` of weighted rows."""
  f = kw_NxF.shape[-1]
  gram_FxF = kw_NxF.T @ kw_NxF + ridge * jnp.eye(f, dtype=jnp.float32)
  return jnp.linalg.solve(gram_FxF, kw_NxF.T @ v_NxD)


def ridge_shift(k_NxF, kh_NxF, gh_NxD, w_N, lr, ridge):
  """`ΔW = (Kᵀ K + λ I)⁻¹ Kᵀ V`, `v_t = −lr ‖k̂_t‖² ĝ_t`, rows weighted."""
  return _solve(k_NxF * w_N.astype(jnp.float32)[:, None],
                shift_targets(kh_NxF, gh_NxD, w_N, lr), ridge)


def _turn(k_NxF, g_NxD, w_N, count, mean, m2, *, lr, ridge, eps):
  """`turn`, plus the regression's weighted rows `(K, V)` (for the
  low-rank form `ΔW = Kᵀ (K Kᵀ + λ I)⁻¹ V`, `factored`)."""
  z_NxC = jnp.concatenate([k_NxF, g_NxD], -1).astype(jnp.float32)
  count, mean, m2 = update_stats(count, mean, m2, z_NxC, w_N)
  zh_NxC = normalize(z_NxC, count, mean, m2, eps)
  f = k_NxF.shape[-1]
  kw_NxF = k_NxF.astype(jnp.float32) * w_N.astype(jnp.float32)[:, None]
  v_NxD = shift_targets(zh_NxC[:, :f], zh_NxC[:, f:], w_N, lr)
  return _solve(kw_NxF, v_NxD, ridge), (count, mean, m2), (kw_NxF, v_NxD)


def turn(k_NxF, g_NxD, w_N, count, mean, m2, *, lr, ridge, eps):
  """One layer's turn: updated statistics and `ΔW` (`[F, D]`)."""
  delta, stats, _ = _turn(k_NxF, g_NxD, w_N, count, mean, m2, lr=lr,
                          ridge=ridge, eps=eps)
  return delta, stats


def factored(k_NxF, v_NxD, owner_N, ridge: float, num_requests: int):
  """Each request's share of one layer's `ΔW`, as factors `(u, v)`.

  `(Kᵀ K + λ I)⁻¹ Kᵀ V = Kᵀ (K Kᵀ + λ I)⁻¹ V` (push-through identity), so
  with `A = (K Kᵀ + λ I)⁻¹ V` (float64, `N × N`: N the weighted token rows)
  `ΔW = Σ_j K_jᵀ A_j` over each request's rows: `u_j = K_jᵀ` `[F, n_j]`,
  `v_j = A_j` `[n_j, D]`. Their sum equals the applied change to float32
  rounding of its solve.

  Args:
    k_NxF, v_NxD: the weighted rows (`_turn`'s), zero rows included.
    owner_N: each row's request index (-1: weight 0, left out).
    ridge: λ.
    num_requests: how many requests.

  Returns:
    One `(u_Fxn, v_nxD)` float32 pair per request.
  """
  keep = owner_N >= 0
  k = np.asarray(k_NxF, np.float64)[keep]
  v = np.asarray(v_NxD, np.float64)[keep]
  owner = owner_N[keep]
  a = np.linalg.solve(k @ k.T + ridge * np.eye(len(k)), v)
  return [(np.ascontiguousarray(k[owner == j].T, np.float32),
           np.ascontiguousarray(a[owner == j], np.float32))
          for j in range(num_requests)]


def token_weights(rows, tokens: str):
  """0/1 weights `[B, L]` of the tokens whose `(k, g)` enter the turn."""
  real_B = (np.asarray(rows["w"]).sum(-1) > 0).astype(np.float32)
  if tokens == "all":
    return np.asarray(rows["mask"], np.float32) * real_B[:, None]
  out = np.zeros(rows["mask"].shape, np.float32)
  b_idx, p_idx = np.nonzero(np.asarray(rows["w"]) > 0)
  out[b_idx, np.asarray(rows["pos"])[b_idx, p_idx]] = 1.0
  return out


@functools.partial(jax.jit, static_argnames=("config", "layers", "lr",
                                             "ridge", "eps", "with_rows"))
def _edit(params, rows, weights_BxL, count, mean, m2, *, config, layers, lr,
          ridge, eps, with_rows):
  facts = mend.factors(config, params, rows, layers, 0)
  w_N = weights_BxL.reshape(-1)
  deltas, stats, regression = [], [], []
  for i, (k_BxLxF, g_BxLxD, _) in enumerate(facts):
    k_NxF = k_BxLxF.reshape(-1, k_BxLxF.shape[-1])
    g_NxD = g_BxLxD.reshape(-1, g_BxLxD.shape[-1])
    delta, st, kv = _turn(k_NxF, g_NxD, w_N, count[i], mean[i], m2[i], lr=lr,
                          ridge=ridge, eps=eps)
    deltas.append(delta)
    stats.append(st)
    regression.append(kv if with_rows else None)
  new = [jnp.stack(x) for x in zip(*stats)]
  return mend.edited(config, params, layers, deltas), new, regression


def _factors_pay(w_BxL, config) -> bool:
  """Whether a call's records carry factors: while they are smaller than the
  dense change, n (F + D) < F D with n the weighted tokens of the call (up
  to ~400 tokens on SmolLM2). Beyond that the records carry none (a
  manifest declares the dense change) and `_edit` returns no rows."""
  f, d = config.intermediate_size, config.hidden_size
  return bool((w_BxL > 0).sum() * (f + d) < f * d)


def _records(reqs, paths, regression, w_BxL, ridge):
  """Each request's low-rank share of every ΔW (`factored`)."""
  owner_N = np.where(w_BxL > 0, np.arange(w_BxL.shape[0])[:, None],
                     -1).reshape(-1)
  touched = [[] for _ in reqs]
  for path, (k_NxF, v_NxD) in zip(paths, regression):
    for j, pair in enumerate(factored(k_NxF, v_NxD, owner_N, ridge,
                                      len(reqs))):
      touched[j].append(base.LeafDelta(tuple(path), pair))
  return base.make_records("ultraedit", reqs, [tuple(t) for t in touched])


def check_hparams(hp: UltraEditHParams, config) -> tuple:
  """The validated edit layers (ConfigError before any work)."""
  if config.arch not in mend.DECODERS:
    raise errors.UnsupportedArchitectureError(
        f"UltraEdit edits decoder LMs ({', '.join(mend.DECODERS)}); got "
        f"{config.arch}.")
  if hp.tokens not in TOKENS:
    raise errors.ConfigError(
        f"ultraedit.tokens={hp.tokens!r}; use one of {TOKENS}.")
  for name in ("lr", "ridge", "eps"):
    if not getattr(hp, name) > 0:
      raise errors.ConfigError(
          f"ultraedit.{name}={getattr(hp, name)} must be > 0.")
  layers = hp.layers or mend.default_layers(config.num_layers)
  return base.check_layers(layers, config.num_layers, "ultraedit.layers")


def ultraedit(hparams: UltraEditHParams = UltraEditHParams()
              ) -> base.FunctionalEditor:
  """The UltraEdit editor (module docstring)."""
  hp = hparams

  def init(model, params=None):
    """Empty normalisers (no statistics: the first turn sets them)."""
    del params
    layers = check_hparams(hp, model.config)
    width = model.config.intermediate_size + model.config.hidden_size
    n = len(layers)
    return UltraEditState(count=np.zeros((n,), np.float32),
                          mean=np.zeros((n, width), np.float32),
                          m2=np.zeros((n, width), np.float32),
                          layers=tuple(layers))

  def apply(model, params, requests, state: UltraEditState):
    """All `requests` as one turn; each request's record names the kernels."""
    reqs = base.make_requests(requests)
    timer = base.Timer()
    with timer("rows"):
      rows = mend.request_rows(model, reqs)
      weights = token_weights(rows, hp.tokens)
    with timer("edit"):
      factors = _factors_pay(np.asarray(weights), model.config)
      new_params, (count, mean, m2), regression = _edit(
          params, rows, weights, state.count, state.mean, state.m2,
          config=model.config, layers=state.layers, lr=float(hp.lr),
          ridge=float(hp.ridge), eps=float(hp.eps), with_rows=factors)
      jax.block_until_ready(new_params)
    paths = {mend.kernel_path(model.config, l): base.get_leaf(
        new_params, mend.kernel_path(model.config, l)) for l in state.layers}
    with timer("records"):
      records = (_records(reqs, paths, regression, np.asarray(weights),
                          float(hp.ridge)) if factors else
                 base.leaf_records("ultraedit", reqs, paths))
    info = base.EditInfo(
        changed=base.describe_changes(params, paths), seconds=timer.seconds,
        extras={"tokens_seen": float(np.asarray(count)[0])},
        records=records)
    return new_params, dataclasses.replace(
        state, count=count, mean=mean, m2=m2,
        edits=np.asarray(int(state.edits) + 1, np.int32)), info

  return base.FunctionalEditor("ultraedit", hp, init, apply)


__all__ = ["UltraEditHParams", "UltraEditState", "check_hparams",
           "factored", "normalize", "ridge_shift", "shift_targets",
           "token_weights", "turn", "ultraedit", "update_stats"]
