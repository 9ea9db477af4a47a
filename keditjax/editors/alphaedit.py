"""AlphaEdit: null-space constrained editing (Fang et al., ICLR 2025).

MEMIT's update trades new facts against preserved knowledge through λ; in
sequential editing the trade accumulates and old knowledge erodes. AlphaEdit
instead projects the update onto the null space of the preserved keys:

  P = Û Ûᵀ, Û the eigenvectors of C_l = E[kkᵀ] with eigenvalue below
  `nullspace_threshold` (eq. 7), and
  ΔW_l = (P(KᵀK + K_pᵀK_p) + αI)⁻¹ P Kᵀ R (eq. 10),

where K_p are the keys of earlier edits, accumulated in the state so that
each call preserves both the corpus keys and every earlier edit. Keys,
targets and the layer spreading are MEMIT's. The state (P_l, K_pᵀK_p,
the edit count) is a pytree of arrays, so a run of sequential edits can be
saved and resumed (`keditjax.editors.state_io`). Each request's record holds
its factors (X_l[:, i], R_l[i]) per layer, X_l = (P(KᵀK + K_pᵀK_p) + αI)⁻¹PKᵀ.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base, memit
from keditjax.kernels import linalg


log = logging.getLogger(__name__)

# Warn at init when a layer's null space holds more of the preserved keys'
# energy than this (percent).
LEAK_WARNING_PERCENT = 1.0


@dataclasses.dataclass(frozen=True)
class AlphaEditHParams(memit.MemitHParams):
  """MEMIT's fields plus the projection.

  Attributes:
    nullspace_threshold: eigenvalues of C below `nullspace_threshold` ×
      (largest eigenvalue) span the null space when `relative_threshold`
      (1e-2 keeps 30-60% of the directions of SmolLM2 layers 3-7, whose
      spectra span only λ_min/λ_max ≈ 2-5e-3),
      else below the absolute value (the paper: 2e-2, for LLaMA3-8B keys).
    relative_threshold: see above.
    l2: α, the ridge term of eq. 10 [L2].
  """
  nullspace_threshold: float = 1e-2
  relative_threshold: bool = True
  l2: float = 10.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlphaEditState:
  """MEMIT's state plus P_l and the running K_pᵀK_p of earlier edits.

  Attributes:
    memit: templates, layers and covariances (`memit.MemitState`).
    projectors: {str(layer): P_l `[F, F]`}.
    edited_keys: {str(layer): K_pᵀK_p `[F, F]`} of the edits so far.
    num_edits: requests written so far (an int32 array).
    nullspace_dims: dim of each layer's null space, aligned with
      `memit.layers` (static).
    nullspace_energy: percent of the preserved keys' energy E‖k‖² inside
      each layer's null space, tr(PC)/tr(C) (`linalg.null_space_energy`;
      AlphaEdit assumes ~0), aligned with `memit.layers` (static).
  """
  memit: memit.MemitState
  projectors: dict
  edited_keys: dict
  num_edits: jax.Array
  nullspace_dims: tuple = dataclasses.field(metadata=dict(static=True))
  nullspace_energy: tuple = dataclasses.field(default=(),
                                              metadata=dict(static=True))

  @property
  def layers(self) -> tuple:
    return self.memit.layers


def alphaedit(hparams: AlphaEditHParams = AlphaEditHParams()
              ) -> base.FunctionalEditor:
  """The AlphaEdit editor for `hparams` (see the module docstring)."""

  def init(model, params=None, *, covariance=None, templates=None):
    """MEMIT's statistics, plus the null-space projector of every layer."""
    inner = memit.init_state(model, params, hparams, covariance, templates)
    projectors, dims, energy = {}, {}, {}
    for layer in inner.layers:
      layer, cov = str(layer), inner.covariance[str(layer)]
      cov = jnp.asarray(cov, jnp.float32)
      threshold = hparams.nullspace_threshold
      if hparams.relative_threshold:
        threshold *= float(jnp.linalg.eigvalsh(cov)[-1])
      projectors[layer], dims[layer] = linalg.null_space_projector(
          cov, threshold)
      if dims[layer] == 0:
        raise errors.ConfigError(
            f"nullspace_threshold={hparams.nullspace_threshold} leaves an "
            f"empty null space at layer {layer}; raise it.")
      energy[layer] = round(100 * linalg.null_space_energy(cov, threshold), 3)
    leaky = {l: e for l, e in energy.items() if e > LEAK_WARNING_PERCENT}
    if leaky:
      log.warning(
          "AlphaEdit: the null space holds %s%% of the preserved keys' "
          "energy at layers %s (the projection assumes ~0): sequential edits "
          "will erode general ability (docs/RESULTS.md, 'Lifelong editing').",
          "/".join(f"{e:.1f}" for e in leaky.values()), "/".join(leaky))
    f = model.config.intermediate_size
    edited = {layer: jnp.zeros((f, f), jnp.float32) for layer in projectors}
    return AlphaEditState(inner, projectors, edited,
                          np.asarray(0, np.int32),
                          tuple(dims[str(l)] for l in inner.layers),
                          tuple(energy[str(l)] for l in inner.layers))

  def apply(model, params, requests, state: AlphaEditState):
    """Writes the batch; the returned state remembers its keys."""
    requests = memit.validate(model, requests)

    def solve(layer, keys, residuals, w):
      del w
      return linalg.alphaedit_update(
          keys, residuals, state.projectors[str(layer)],
          state.edited_keys[str(layer)], hparams.l2)

    def factor(layer, keys):
      return linalg.alphaedit_factor(
          keys, state.projectors[str(layer)], state.edited_keys[str(layer)],
          hparams.l2)

    new_params, info, keys = memit.spread_update(
        model, params, requests, state.memit, hparams, solve, factor,
        "alphaedit")
    edited = {layer: state.edited_keys[layer] +
              jnp.asarray(keys[int(layer)].T @ keys[int(layer)], jnp.float32)
              for layer in state.edited_keys}
    info.extras["nullspace_dims"] = dict(zip(state.layers,
                                             state.nullspace_dims))
    info.extras["nullspace_energy_percent"] = dict(zip(
        state.layers, state.nullspace_energy))
    new_state = dataclasses.replace(
        state, edited_keys=edited,
        num_edits=np.asarray(int(state.num_edits) + len(requests), np.int32))
    return new_params, new_state, info

  return base.FunctionalEditor("alphaedit", hparams, init, apply)


__all__ = ["AlphaEditHParams", "AlphaEditState", "alphaedit"]
