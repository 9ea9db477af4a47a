"""Closed-form weight updates of the direct editors (no model knowledge).

Orientation: a linear map `value_D = key_F @ W_FxD` (our kernels are
`[in, out]`), so a "key" is a row vector and updates are `[F, D]`.

  - `rank_one_update`   ROME (Meng et al. 2022, eq. 2),
  - `memit_update`      MEMIT (Meng et al. 2023, eq. 14),
  - `null_space_projector`, `alphaedit_update`   AlphaEdit (Fang et al. 2025,
    eqs. 7-10);
  - `rank_one_factors`, `memit_factor`, `alphaedit_factor`: the same updates
    in factored form, ΔW = u @ v or X @ R (edit records); the updates
    themselves are computed as above, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def rank_one_update(w_FxD, key_F, value_D, cinv_key_F):
  """The rank-one ΔW with `key @ (W + ΔW) = value` (ROME eq. 2).

  ROME minimises `||ΔW||` in the metric of the key covariance C subject to
  the new key-value pair: ΔW = (C⁻¹k)(v − kW)ᵀ / (kᵀC⁻¹k). `cinv_key_F` is
  C⁻¹k (just `k` for the identity-covariance variant).

  Args:
    w_FxD: the current kernel.
    key_F: k*, the key to rewrite.
    value_D: v*, the value it must map to.
    cinv_key_F: C⁻¹ k*.

  Returns:
    ΔW `[F, D]` (rank one).
  """
  residual_D = value_D - key_F @ w_FxD
  return jnp.outer(cinv_key_F, residual_D) / jnp.dot(key_F, cinv_key_F)


@jax.jit
def rank_one_factors(w_FxD, key_F, value_D, cinv_key_F):
  """`rank_one_update`'s ΔW as factors `(u_Fx1, v_1xD)`, ΔW = u @ v.

  u = C⁻¹k / (kᵀC⁻¹k), v = v* − kW (ROME eq. 2, the edit record's form).
  """
  residual_D = value_D - key_F @ w_FxD
  u_F = cinv_key_F / jnp.dot(key_F, cinv_key_F)
  return u_F[:, None], residual_D[None, :]


@jax.jit
def memit_update(keys_NxF, residuals_NxD, cov_FxF, lam):
  """MEMIT's batched least-squares update (Meng et al. 2023, eq. 14).

  Minimises `λ·tr(ΔWᵀ C ΔW) + Σᵢ ||kᵢ ΔW − rᵢ||²`, i.e.
  ΔW = (λC + KᵀK)⁻¹ Kᵀ R: it writes the residuals `R` at the new keys while
  keeping the outputs of the preserved keys (second moment C) close. A huge
  λ leaves W unchanged; one key and λ → 0 give ROME's rank-one update.

  Args:
    keys_NxF: one key per edit.
    residuals_NxD: the change each key's value needs.
    cov_FxF: preserved-key second moment E[kkᵀ].
    lam: λ, the weight of preservation.

  Returns:
    ΔW `[F, D]`.
  """
  a_FxF = lam * cov_FxF + keys_NxF.T @ keys_NxF
  return jax.scipy.linalg.solve(a_FxF, keys_NxF.T @ residuals_NxD,
                                assume_a="pos")


@jax.jit
def memit_factor(keys_NxF, cov_FxF, lam):
  """X `[F, N]` with `memit_update(K, R, C, λ) = X @ R`: (λC + KᵀK)⁻¹Kᵀ.

  Column i times the residual row rᵢ is request i's share of ΔW (its edit
  record's factors).
  """
  a_FxF = lam * cov_FxF + keys_NxF.T @ keys_NxF
  return jax.scipy.linalg.solve(a_FxF, keys_NxF.T, assume_a="pos")


def null_space_projector(cov_FxF, threshold: float):
  """Projector onto the span of C's eigenvectors with eigenvalue < threshold.

  AlphaEdit (Fang et al. 2025, eq. 7): keys of preserved knowledge lie
  (almost) in the span of C's large-eigenvalue directions, so an update
  `P·X` leaves their outputs unchanged.

  Returns:
    (P_FxF, the null-space dimension).
  """
  eigvals, eigvecs = jnp.linalg.eigh(cov_FxF)
  keep = (eigvals < threshold).astype(eigvecs.dtype)
  return (eigvecs * keep) @ eigvecs.T, int(jnp.sum(keep))


def null_space_energy(cov_FxF, threshold: float) -> float:
  """tr(P C) / tr(C): the share of the preserved keys' energy E‖k‖² that
  lies in the null space of `null_space_projector(cov, threshold)`.

  AlphaEdit's premise is that this share is ~0 (an update inside the null
  space leaves preserved outputs unchanged); each unit of it is output
  change the projection does not prevent. With a flat key spectrum (small
  models) it is not small: docs/RESULTS.md, "Lifelong editing".
  """
  eigvals = jnp.linalg.eigvalsh(jnp.asarray(cov_FxF))
  return float(jnp.sum(jnp.where(eigvals < threshold, eigvals, 0.0)) /
               jnp.sum(eigvals))


@jax.jit
def alphaedit_update(keys_NxF, residuals_NxD, projector_FxF, prev_FxF, l2):
  """AlphaEdit's null-space-constrained update (Fang et al. 2025, eq. 10).

  ΔW = (P(KᵀK + K_pᵀK_p) + αI)⁻¹ P Kᵀ R, where K_p are the keys of earlier
  edits (`prev_FxF = K_pᵀK_p`, for sequential editing) and α = `l2`. The
  solution lies in the range of P, so `K_preserved ΔW ≈ 0`.

  Returns:
    ΔW `[F, D]`.
  """
  f = keys_NxF.shape[1]
  a_FxF = (projector_FxF @ (keys_NxF.T @ keys_NxF + prev_FxF) +
           l2 * jnp.eye(f, dtype=keys_NxF.dtype))
  return jnp.linalg.solve(a_FxF, projector_FxF @ keys_NxF.T @ residuals_NxD)


@jax.jit
def alphaedit_factor(keys_NxF, projector_FxF, prev_FxF, l2):
  """X `[F, N]` with `alphaedit_update(K, R, P, K_pᵀK_p, α) = X @ R`:
  (P(KᵀK + K_pᵀK_p) + αI)⁻¹ P Kᵀ (per-request factors, as `memit_factor`)."""
  f = keys_NxF.shape[1]
  a_FxF = (projector_FxF @ (keys_NxF.T @ keys_NxF + prev_FxF) +
           l2 * jnp.eye(f, dtype=keys_NxF.dtype))
  return jnp.linalg.solve(a_FxF, projector_FxF @ keys_NxF.T)
