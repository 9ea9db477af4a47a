"""Named edit sites: read and patch activations by name, without hooks.

Every architecture's forward pass calls `sites.visit(name, x_BxLxD, out)` at
the same named points, so one mechanism serves ROME, MEMIT, causal tracing,
knowledge neurons and the architectural editors:

  - `embed`                 token (and position) embeddings entering block 0,
  - `layer/{l}/attn/out`    the attention output (after its output projection),
  - `layer/{l}/mlp/key`     the input of the MLP output projection (ROME's k),
  - `layer/{l}/mlp/value`   the output of the MLP output projection (ROME's v),
  - `layer/{l}/resid`       the residual stream after block `l`.

A `Sites` value is a pytree: patch values and positions are traced leaves, the
capture list and patch modes are static. So `jax.jit`, `jax.grad` (w.r.t. a
patch value) and `jax.vmap` work through it, and changing a delta never
recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from keditjax import errors

SITE_KINDS = ("attn/out", "mlp/key", "mlp/value", "resid")
_LAYER_SITE_RE = re.compile(r"^layer/(\d+)/(attn/out|mlp/key|mlp/value|resid)$")
PATCH_MODES = ("add", "replace")


def site_names(num_layers: int) -> tuple[str, ...]:
  """All site names of a model with `num_layers` blocks, in forward order."""
  names = ["embed"]
  for layer in range(num_layers):
    names += [f"layer/{layer}/{kind}" for kind in SITE_KINDS]
  return tuple(names)


def parse_site(name: str, num_layers: int) -> tuple[int | None, str]:
  """Splits a site name into `(layer, kind)`; `embed` gives `(None, "embed")`.

  Raises:
    SiteError: the name is malformed or its layer does not exist.
  """
  if name == "embed":
    return None, "embed"
  match = _LAYER_SITE_RE.match(name) if isinstance(name, str) else None
  if match is None:
    raise errors.SiteError(
        f"Unknown edit site {name!r}: valid sites are 'embed' and "
        f"'layer/{{l}}/{{kind}}' with kind in {SITE_KINDS}.")
  layer = int(match.group(1))
  if not 0 <= layer < num_layers:
    raise errors.SiteError(
        f"Edit site {name!r} names layer {layer}, but the model has layers "
        f"0..{num_layers - 1}.")
  return layer, match.group(2)


def _gather_positions(x_BxLxD, positions):
  """x[b, positions[b, p]] -> [B, P, D]; positions is [P] or [B, P]."""
  positions = jnp.asarray(positions, jnp.int32)
  if positions.ndim == 1:
    return x_BxLxD[:, positions]
  return jnp.take_along_axis(x_BxLxD, positions[..., None], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Patch:
  """A change to one site's activation.

  Attributes:
    value: the delta (`mode="add"`) or the new activation (`mode="replace"`),
      broadcastable to `[B, P, D]` when `positions` is given, else to
      `[B, L, D]`.
    positions: token positions to patch, int `[P]` (same for every row) or
      `[B, P]` (per row); None patches every position.
    mode: "add" or "replace" (static).
  """
  value: Any
  positions: Any = None
  mode: str = dataclasses.field(default="add", metadata=dict(static=True))

  def __post_init__(self):
    if self.mode not in PATCH_MODES:
      raise errors.SiteError(
          f"Patch mode {self.mode!r} is not one of {PATCH_MODES}.")

  def apply(self, x_BxLxD):
    """Returns the activation with this patch applied."""
    value = jnp.asarray(self.value, x_BxLxD.dtype)
    if self.positions is None:
      value = jnp.broadcast_to(value, x_BxLxD.shape)
      return x_BxLxD + value if self.mode == "add" else value
    batch, _, dim = x_BxLxD.shape
    positions = jnp.asarray(self.positions, jnp.int32)
    if positions.ndim == 1:
      positions = jnp.broadcast_to(positions, (batch,) + positions.shape)
    rows_Bx1 = jnp.arange(batch)[:, None]
    value_BxPxD = jnp.broadcast_to(value, positions.shape + (dim,))
    if self.mode == "add":
      return x_BxLxD.at[rows_Bx1, positions].add(value_BxPxD)
    return x_BxLxD.at[rows_Bx1, positions].set(value_BxPxD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sites:
  """Which sites to capture and how to patch others, for one forward pass.

  Attributes:
    patches: site name -> `Patch`. Applied where the forward pass visits the
      site, so later sites see the change.
    capture: site names whose activation (after any patch) is returned (static).
    capture_positions: int `[P]` or `[B, P]` positions to keep in captures;
      None keeps all `L` positions.
  """
  patches: dict[str, Patch] = dataclasses.field(default_factory=dict)
  capture: tuple[str, ...] = dataclasses.field(
      default=(), metadata=dict(static=True))
  capture_positions: Any = None

  def __post_init__(self):
    if isinstance(self.capture, str):
      object.__setattr__(self, "capture", (self.capture,))
    else:
      object.__setattr__(self, "capture", tuple(self.capture))

  def validate(self, num_layers: int) -> None:
    """Raises `SiteError` if any named site does not exist in the model."""
    for name in tuple(self.patches) + self.capture:
      parse_site(name, num_layers)
    for name, patch in self.patches.items():
      if not isinstance(patch, Patch):
        raise errors.SiteError(
            f"sites.patches[{name!r}] must be a keditjax Patch, got "
            f"{type(patch).__name__}.")

  def visit(self, name: str, x_BxLxD, out: dict):
    """Applies the patch for `name` (if any), records a capture, returns x."""
    patch = self.patches.get(name)
    if patch is not None:
      x_BxLxD = patch.apply(x_BxLxD)
    if name in self.capture:
      out[name] = (x_BxLxD if self.capture_positions is None else
                   _gather_positions(x_BxLxD, self.capture_positions))
    return x_BxLxD


NO_SITES = Sites()


def capture(*names: str, positions=None) -> Sites:
  """Shorthand: `Sites` that only captures `names` (at `positions`)."""
  return Sites(capture=tuple(names), capture_positions=positions)


def patch(name: str, value, positions=None, mode: str = "add") -> Sites:
  """Shorthand: `Sites` with one patch."""
  return Sites(patches={name: Patch(value, positions, mode)})
