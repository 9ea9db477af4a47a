"""Second moments of edit keys: streaming accumulation and validation.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
Eq. 2) and MEMIT (Meng et al. 2023, Eq. 14) weight their least-squares
updates by the uncentred second moment `C = E[k kᵀ]` of the MLP keys `k`;
AlphaEdit (Fang et al. 2025, Sec. 3) projects updates onto the null space of
`K₀ K₀ᵀ`, the same matrix up to the token count. Both are estimated as

  C = (1 / N) Σₙ kₙ kₙᵀ = Kᵀ K / N,   K = [k₁ ... k_N]ᵀ ∈ R^{N×F},

streamed over a corpus one batch at a time. Rows of `K` whose mask is 0
(padding) contribute nothing, neither to the sum nor to `N`.

Dtypes: the accumulator's dtype decides the product's. A float32 accumulator
forms `KᵀK` in float32 at the highest matmul precision (no TF32 / bfloat16
passes on accelerators). A float64 accumulator (keys are cast up, as ROME's
`mom2_dtype="float64"` does) needs 64-bit JAX: create it and call
`accumulate` inside `with jax.enable_x64(True):` (`init` does the former).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors

ACCUMULATOR_DTYPES = ("float32", "float64")


def init(features: int, dtype: str = "float32"):
  """Zero accumulators `(mom2_FxF, count)` for keys of width `features`.

  Args:
    features: the key width F.
    dtype: "float32" or "float64" (the float64 one is made under 64-bit JAX;
      keep using it inside `jax.enable_x64(True)`).

  Returns:
    `(zeros [F, F] of dtype, int32 scalar 0)` as JAX arrays.

  Raises:
    ConfigError: `dtype` is not an accumulator dtype.
  """
  if str(dtype) not in ACCUMULATOR_DTYPES:
    raise errors.ConfigError(
        f"accumulator dtype={dtype!r}; use one of {ACCUMULATOR_DTYPES}.")
  x64 = (jax.enable_x64(True) if str(dtype) == "float64"
         else contextlib.nullcontext())
  with x64:
    return (jnp.zeros((features, features), dtype),
            jnp.zeros((), jnp.int32))


def _block_bounds(features: int, blocks: int | None) -> list[int]:
  if blocks is None:  # ~4 blocks of >= 256 features; small F: one matmul
    blocks = max(1, min(4, features // 256))
  return [round(i * features / blocks) for i in range(blocks + 1)]


def outer_sum(keys_NxF, mask_N, dtype, *, blocks: int | None = None):
  """`Σₙ mask[n] kₙ kₙᵀ` in `dtype`, un-jitted (for use inside a jit).

  Masked rows are zeroed rather than gathered out, so shapes stay static and
  one compilation serves every batch, padded or not. The product is
  symmetric, so with `b` column blocks only the `b(b+1)/2` blocks on and
  above the diagonal are multiplied and the others mirrored: 10/16 of the
  flops of one `KᵀK` for `b = 4`, and an exactly symmetric result.

  Args:
    keys_NxF: keys, one row per token.
    mask_N: 1/True for real tokens, 0/False for padding.
    dtype: the accumulation dtype (the keys are cast to it first).
    blocks: column blocks (None: up to 4, of at least 256 features).

  Returns:
    `[F, F]` array of `dtype`.
  """
  keys_NxF = jnp.where(mask_N.astype(bool)[:, None], keys_NxF, 0).astype(dtype)
  bounds = _block_bounds(keys_NxF.shape[1], blocks)
  parts = [keys_NxF[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
  upper = {(i, j): jnp.einsum("nf,ng->fg", parts[i], parts[j],
                              precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=dtype)
           for i in range(len(parts)) for j in range(i, len(parts))}
  # A diagonal block's (f, g) and (g, f) may be reduced in different orders
  # (XLA's AVX2 CPU code does): average them, which is exactly symmetric.
  for i in range(len(parts)):
    upper[i, i] = (upper[i, i] + upper[i, i].T) * 0.5
  if len(parts) == 1:
    return upper[0, 0]
  return jnp.concatenate([
      jnp.concatenate([upper[i, j] if j >= i else upper[j, i].T
                       for j in range(len(parts))], axis=1)
      for i in range(len(parts))], axis=0)


@functools.partial(jax.jit, donate_argnums=(0,))
def accumulate(mom2_FxF, count, keys_NxF, mask_N):
  """Adds one batch of keys to the running second moment (ROME Eq. 2).

  Args:
    mom2_FxF: running `Σ k kᵀ` (float32 or float64; donated).
    count: running number of real tokens (int32 scalar).
    keys_NxF: the batch's keys (any float dtype).
    mask_N: 1/True for real tokens, 0/False for padding rows.

  Returns:
    `(mom2_FxF + Σ mask·k kᵀ, count + Σ mask)`, same dtypes as the inputs.
  """
  mom2_FxF = mom2_FxF + outer_sum(keys_NxF, mask_N, mom2_FxF.dtype)
  return mom2_FxF, count + jnp.sum(mask_N.astype(jnp.int32))


def finalize(mom2_FxF, count) -> np.ndarray:
  """`E[k kᵀ] = Σ k kᵀ / N` as a NumPy array of the accumulator's dtype.

  Raises:
    InputError: no token was accumulated (`count == 0`).
  """
  count = int(count)
  if count <= 0:
    raise errors.InputError(
        "no tokens were accumulated (count=0): the second moment is "
        "undefined; feed a non-empty, unmasked batch.")
  mom2_FxF = np.asarray(mom2_FxF)
  return mom2_FxF / mom2_FxF.dtype.type(count)


def _default_rcond(dtype, features: int) -> float:
  """Below this `λ_min / λ_max` a second moment counts as singular.

  float32: its resolution `eps` (the null eigenvalues of a float32-accumulated
  Gram matrix of real SmolLM2 keys sit near 2e-9, ~50x lower, while
  WikiText-2 statistics of its layers sit at 1e-6 or above). float64 and
  wider: numpy's rank threshold `F * eps`.
  """
  eps = float(np.finfo(dtype).eps)
  return eps if np.dtype(dtype).itemsize <= 4 else features * eps


def check_covariance(cov_FxF, name: str = "covariance", *,
                     rcond: float | None = None,
                     symmetry_rtol: float = 1e-4) -> np.ndarray:
  """Refuses a second moment that cannot weight a least-squares edit.

  ROME's rank-one update solves `C⁻¹ k` (Meng et al. 2022, Eq. 2) and MEMIT
  solves `(λC + K Kᵀ)⁻¹` (Meng et al. 2023, Eq. 14); a NaN, asymmetric,
  indefinite or singular `C` silently yields garbage weights. Call it on the
  matrix as accumulated (before casting it up), once per statistic, before
  any solve. Costs one `eigvalsh` (~0.5 s for F = 1536).

  Args:
    cov_FxF: the matrix (NumPy or JAX, any float dtype).
    name: what to call it in errors (e.g. "layer/4/mlp/key second moment").
    rcond: smallest admissible `λ_min / λ_max`; default: `eps` of a float32
      matrix, `F · eps` of a float64 one (see `_default_rcond`). Ill-
      conditioned statistics above it pass: real ones are (1e-6 to 1e-3 for
      SmolLM2). Pass 0 to accept singular positive semi-definite matrices
      (AlphaEdit projects onto their null space).
    symmetry_rtol: allowed `max|C - Cᵀ| / max|C|`.

  Returns:
    The matrix as a NumPy array (unchanged).

  Raises:
    InputError: not square, not finite, all zeros, not symmetric, an
      eigenvalue below `-F · eps · λ_max` (not PSD), or `λ_min < rcond ·
      λ_max` (singular).
  """
  cov_FxF = np.asarray(cov_FxF)
  if cov_FxF.ndim != 2 or cov_FxF.shape[0] != cov_FxF.shape[1]:
    raise errors.InputError(f"{name} must be a square [F, F] matrix, got "
                            f"shape {cov_FxF.shape}.")
  if not np.issubdtype(cov_FxF.dtype, np.floating):
    raise errors.InputError(f"{name} must be floating point, got "
                            f"{cov_FxF.dtype}.")
  bad = ~np.isfinite(cov_FxF)
  if bad.any():
    raise errors.InputError(
        f"{name} has {int(bad.sum())} non-finite (NaN/inf) entries; "
        "recompute the statistics (a corrupt cache or an overflowing model).")
  scale = float(np.abs(cov_FxF).max()) if cov_FxF.size else 0.0
  if scale == 0.0:
    raise errors.InputError(f"{name} is all zeros (singular); were any "
                            "tokens accumulated?")
  asym = float(np.abs(cov_FxF - cov_FxF.T).max()) / scale
  if asym > symmetry_rtol:
    raise errors.InputError(
        f"{name} is not symmetric (max |C - Cᵀ| / max |C| = {asym:.2e} > "
        f"{symmetry_rtol:.0e}); a second moment always is.")
  features = cov_FxF.shape[0]
  if rcond is None:
    rcond = _default_rcond(cov_FxF.dtype, features)
  eig = np.linalg.eigvalsh(0.5 * (cov_FxF + cov_FxF.T).astype(np.float64))
  lo, hi = float(eig[0]), float(eig[-1])
  # Rounding leaves the null eigenvalues of a PSD matrix slightly negative;
  # only below numpy's rank threshold is it truly indefinite.
  if lo < -features * float(np.finfo(cov_FxF.dtype).eps) * hi:
    raise errors.InputError(
        f"{name} is not positive semi-definite (smallest eigenvalue {lo:.3e}, "
        f"largest {hi:.3e}).")
  if rcond > 0 and lo < rcond * hi:
    raise errors.InputError(
        f"{name} is singular (λ_min / λ_max = {lo / hi:.3e} < rcond="
        f"{rcond:.1e}); accumulate more tokens than its size ({features}), "
        "add a ridge term, or pass rcond=0 to accept a semi-definite "
        "matrix.")
  return cov_FxF
