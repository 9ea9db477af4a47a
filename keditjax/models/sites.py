"""Named edit sites: read and patch activations by name, without hooks.

Every architecture's forward pass calls `sites.visit(name, x_BxLxD, out)` at
the same named points, so one mechanism serves ROME, MEMIT, causal tracing,
knowledge neurons and the architectural editors:

  - `embed`                 token (and position) embeddings entering block 0,
  - `layer/{l}/attn/out`    the attention output (after its output projection),
  - `layer/{l}/mlp/in`      the MLP input (after the block's norm),
  - `layer/{l}/mlp/key`     the input of the MLP output projection (ROME's k),
  - `layer/{l}/mlp/value`   the output of the MLP output projection (ROME's v),
  - `layer/{l}/resid`       the residual stream after block `l`.

Adapters (`keditjax.models.adapters`) stored in `params["adapters"]` are
applied at their site before any patch; `lm` moves them into `Sites.adapters`
so the architectures need no other hook.

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
from keditjax.models import adapters as adapters_lib

# In the order a block visits them (adapters may only read earlier ones).
SITE_KINDS = ("attn/out", "mlp/in", "mlp/key", "mlp/value", "resid")
_LAYER_SITE_RE = re.compile(
    r"^layer/(\d+)/(attn/out|mlp/in|mlp/key|mlp/value|resid)$")
# Activations kept for an adapter's declared inputs live in `out` under this
# prefix; `captures` drops them before `out` leaves the jitted pass.
_STASH = "\x00adapter-input:"
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


def check_adapters(adapters, num_layers: int) -> None:
  """Raises `SiteError` for an adapter at an unknown site, or one reading a
  site that does not come before its own in the same block.

  Args:
    adapters: site name -> tuple of `adapters.Adapter` (`params["adapters"]`).
    num_layers: the model depth.
  """
  for site, stack in adapters.items():
    layer, kind = parse_site(site, num_layers)
    if not isinstance(stack, (tuple, list)):
      raise errors.SiteError(
          f"params['adapters'][{site!r}] must be a tuple of Adapters.")
    for a in stack:
      if not isinstance(a, adapters_lib.Adapter):
        raise errors.SiteError(
            f"params['adapters'][{site!r}] holds a {type(a).__name__}, not "
            "an Adapter.")
      for need in a.inputs:
        if layer is None or need not in SITE_KINDS or (
            SITE_KINDS.index(need) >= SITE_KINDS.index(kind)):
          raise errors.SiteError(
              f"the {a.kind} adapter at {site!r} reads {need!r}, which is not "
              f"a site of the same block visited before it (order: "
              f"{SITE_KINDS}).")


def _split_block(name: str) -> tuple[str, str]:
  """"layer/3/mlp/value" -> ("layer/3", "mlp/value")."""
  parts = name.split("/", 2)
  return "/".join(parts[:2]), parts[2]


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
    adapters: site name -> tuple of `adapters.Adapter`, applied in order at
      the site before its patch (normally filled from `params["adapters"]`
      by `with_adapters`).
  """
  patches: dict[str, Patch] = dataclasses.field(default_factory=dict)
  capture: tuple[str, ...] = dataclasses.field(
      default=(), metadata=dict(static=True))
  capture_positions: Any = None
  adapters: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if isinstance(self.capture, str):
      object.__setattr__(self, "capture", (self.capture,))
    else:
      object.__setattr__(self, "capture", tuple(self.capture))

  def validate(self, num_layers: int) -> None:
    """Raises `SiteError` if any named site does not exist in the model."""
    for name in tuple(self.patches) + self.capture:
      parse_site(name, num_layers)
    check_adapters(self.adapters, num_layers)
    for name, patch in self.patches.items():
      if not isinstance(patch, Patch):
        raise errors.SiteError(
            f"sites.patches[{name!r}] must be a keditjax Patch, got "
            f"{type(patch).__name__}.")

  def with_adapters(self, adapters) -> "Sites":
    """These sites plus `adapters` (site -> tuple), after any already held."""
    if not adapters:
      return self
    merged = dict(self.adapters)
    for site, stack in adapters.items():
      merged[site] = tuple(merged.get(site, ())) + tuple(stack)
    return dataclasses.replace(self, adapters=merged)

  def visit(self, name: str, x_BxLxD, out: dict):
    """Applies the adapters and the patch for `name` (if any), records a
    capture, returns x."""
    stack = self.adapters.get(name)
    if stack:
      prefix, _ = _split_block(name)
      needs = {kind for a in stack for kind in a.inputs}
      inputs = {kind: out[_STASH + prefix + "/" + kind] for kind in needs}
      for adapter in stack:
        x_BxLxD = adapter(x_BxLxD, inputs).astype(x_BxLxD.dtype)
    patch = self.patches.get(name)
    if patch is not None:
      x_BxLxD = patch.apply(x_BxLxD)
    if name in self.capture:
      out[name] = (x_BxLxD if self.capture_positions is None else
                   _gather_positions(x_BxLxD, self.capture_positions))
    if self.adapters and self._is_input(name):
      out[_STASH + name] = x_BxLxD
    return x_BxLxD

  def _is_input(self, name: str) -> bool:
    """Whether an adapter of the same block reads site `name`."""
    if not name.startswith("layer/"):
      return False
    prefix, kind = _split_block(name)
    return any(site.startswith(prefix + "/") and kind in a.inputs
               for site, stack in self.adapters.items() for a in stack)


NO_SITES = Sites()


def captures(out: dict) -> dict:
  """`out` without the activations stashed for adapter inputs."""
  return {k: v for k, v in out.items() if not k.startswith(_STASH)}


def capture(*names: str, positions=None) -> Sites:
  """Shorthand: `Sites` that only captures `names` (at `positions`)."""
  return Sites(capture=tuple(names), capture_positions=positions)


def patch(name: str, value, positions=None, mode: str = "add") -> Sites:
  """Shorthand: `Sites` with one patch."""
  return Sites(patches={name: Patch(value, positions, mode)})
