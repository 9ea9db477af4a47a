"""Adapters: modules beside the weights, living in the params pytree.

An `Adapter` is traced parameters plus a static pure function that maps one
named site's activation to a new activation:

  x_BxLxD' = fn(adapter.params, x_BxLxD, inputs, **dict(adapter.options))

where `inputs` holds the activations of the *earlier* sites of the same block
that the adapter declared (`inputs=("mlp/key",)` for a codebook that reads the
MLP output projection's input and replaces its output). Adapters are stored in
the parameter pytree itself,

  params["adapters"]["layer/24/mlp/value"] = (adapter_0, adapter_1, ...)

applied in tuple order, so every path that takes params (forward, scoring,
generation with a KV cache, partial and sharded passes) sees them, and undo is
"keep the old pytree". The architectural editors (GRACE, T-Patcher, WISE) are
built on this; `lm` splits `params["adapters"]` off before the Flax module
runs and hands them to `Sites`.

An adapter must be position-wise causal for KV-cached generation to equal a
full forward pass: the output at position t may depend only on positions
≤ t (every adapter in keditjax is, unless its docstring says otherwise).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from keditjax import errors

ADAPTERS_KEY = "adapters"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter at a site.

  Attributes:
    params: a pytree of arrays (traced: changing them never recompiles).
    fn: `fn(params, x_BxLxD, inputs, **options) -> x_BxLxD'`, a module-level
      function (static; saved by its import name).
    inputs: site kinds of the same block it reads, e.g. ("mlp/key",); each
      must come before the adapter's own site in the forward pass (static).
    options: static settings, a tuple of (name, value) pairs.
    kind: a short name for listings and errors ("grace", ...) (static).
  """
  params: Any
  fn: Callable = dataclasses.field(metadata=dict(static=True))
  inputs: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  options: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  kind: str = dataclasses.field(default="adapter",
                                metadata=dict(static=True))

  def __post_init__(self):
    if not callable(self.fn):
      raise errors.SiteError(f"Adapter fn must be callable, got {self.fn!r}.")
    object.__setattr__(self, "inputs", tuple(self.inputs))
    object.__setattr__(self, "options", tuple(
        (str(k), v) for k, v in (self.options.items()
                                 if isinstance(self.options, Mapping)
                                 else self.options)))

  def __call__(self, x_BxLxD, inputs: Mapping[str, Any]):
    return self.fn(self.params, x_BxLxD, inputs, **dict(self.options))


def split(params):
  """`(params without "adapters", {site: (Adapter, ...)})`; no copy when
  there are none."""
  if not isinstance(params, Mapping) or ADAPTERS_KEY not in params:
    return params, {}
  rest = {k: v for k, v in params.items() if k != ADAPTERS_KEY}
  return rest, dict(params[ADAPTERS_KEY])


def has_adapters(params) -> bool:
  """Whether `params` carries any adapter."""
  return bool(split(params)[1])


def at(params, site: str) -> tuple:
  """The adapters at `site` (an empty tuple when none)."""
  return tuple(split(params)[1].get(site, ()))


def with_adapters(params, site: str, adapters) -> dict:
  """A new params pytree whose adapters at `site` are `adapters` (a tuple).

  Every other leaf is shared with `params`, which is left untouched; an empty
  tuple removes the site's entry (and "adapters" itself once empty).
  """
  rest, table = split(params)
  table = dict(table)
  adapters = tuple(adapters)
  for a in adapters:
    if not isinstance(a, Adapter):
      raise errors.SiteError(
          f"params['adapters'][{site!r}] must hold keditjax Adapters, got "
          f"{type(a).__name__}.")
  if adapters:
    table[site] = adapters
  else:
    table.pop(site, None)
  out = dict(rest)
  if table:
    out[ADAPTERS_KEY] = table
  return out


def find(params, site: str, kind: str):
  """(index in the site's stack, the first adapter of `kind`) or (None,
  None)."""
  for i, a in enumerate(at(params, site)):
    if a.kind == kind:
      return i, a
  return None, None


def put(params, site: str, kind: str, adapter) -> dict:
  """params with the site's adapter of `kind` replaced by `adapter` (appended
  when the site has none; dropped when `adapter` is None). An editor that
  keeps one growing adapter per site (GRACE, T-Patcher, WISE) writes it back
  with this."""
  index, _ = find(params, site, kind)
  stack = list(at(params, site))
  if index is None:
    stack.append(adapter)
  elif adapter is None:
    del stack[index]
  else:
    stack[index] = adapter
  return with_adapters(params, site, [a for a in stack if a is not None])


def grow(adapter: Adapter, needed: int) -> Adapter:
  """The adapter with at least `needed` slots, doubling its capacity.

  Every leaf of `adapter.params` must have the slot axis first; new slots
  are zeros. Doubling keeps the number of compiled shapes logarithmic in the
  number of edits.
  """
  cap = jax.tree.leaves(adapter.params)[0].shape[0]
  if needed <= cap:
    return adapter
  new_cap = max(cap, 1)
  while new_cap < needed:
    new_cap *= 2
  pad = lambda x: jax.numpy.concatenate(
      [x, jax.numpy.zeros((new_cap - cap,) + x.shape[1:], x.dtype)])
  return dataclasses.replace(adapter, params=jax.tree.map(pad, adapter.params))


def set_slot(adapter: Adapter, index, **fields) -> Adapter:
  """The adapter with `params[name][index] = value` for each field."""
  p = dict(adapter.params)
  for name, value in fields.items():
    p[name] = p[name].at[index].set(value)
  return dataclasses.replace(adapter, params=p)


# -- keditjax's own format ------------------------------------------------

def _fn_name(fn) -> str:
  name = f"{fn.__module__}:{fn.__qualname__}"
  if not fn.__module__.startswith("keditjax.") or "<" in fn.__qualname__:
    raise errors.CheckpointError(
        f"adapter function {name} cannot be saved: only module-level "
        "functions of keditjax are restored by name.")
  return name


def _resolve(name: str):
  module, _, qualname = name.partition(":")
  if not module.startswith("keditjax.") or not qualname:
    raise errors.CheckpointError(f"refusing to import adapter function {name!r}.")
  obj = importlib.import_module(module)
  for part in qualname.split("."):
    obj = getattr(obj, part)
  return obj


def save(directory: str, params) -> list:
  """Writes params' adapters as `adapters.safetensors` + `adapters.json`.

  Returns:
    The JSON description (one item per adapter: site, order, kind, function,
    inputs, options, leaf names).
  """
  from safetensors.numpy import save_file
  _, table = split(params)
  tensors, spec = {}, []
  for site in sorted(table):
    for order, a in enumerate(table[site]):
      leaves, treedef = jax.tree_util.tree_flatten_with_path(a.params)
      names = []
      for path, leaf in leaves:
        name = f"{site}#{order}#" + jax.tree_util.keystr(path)
        tensors[name] = np.asarray(leaf)
        names.append(name)
      spec.append({"site": site, "order": order, "kind": a.kind,
                   "fn": _fn_name(a.fn), "inputs": list(a.inputs),
                   "options": [[k, v] for k, v in a.options],
                   "leaves": names,
                   "treedef": _treedef_json(a.params)})
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "adapters.safetensors"))
  with open(os.path.join(directory, "adapters.json"), "w") as f:
    json.dump(spec, f, indent=1)
  return spec


def _treedef_json(tree):
  """A JSON skeleton of nested dicts/lists (the only containers adapters use)."""
  if isinstance(tree, Mapping):
    return {k: _treedef_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_treedef_json(v) for v in tree]
  return None


def _fill(skeleton, leaves):
  if isinstance(skeleton, dict):
    return {k: _fill(v, leaves) for k, v in sorted(skeleton.items())}
  if isinstance(skeleton, list):
    return tuple(_fill(v, leaves) for v in skeleton)
  return next(leaves)


def load(directory: str, params):
  """`params` with the adapters saved in `directory` (none saved: unchanged)."""
  spec_path = os.path.join(directory, "adapters.json")
  if not os.path.exists(spec_path):
    return params
  from safetensors.numpy import load_file
  with open(spec_path) as f:
    spec = json.load(f)
  tensors = load_file(os.path.join(directory, "adapters.safetensors"))
  table: dict[str, list] = {}
  for item in sorted(spec, key=lambda s: (s["site"], s["order"])):
    missing = [n for n in item["leaves"] if n not in tensors]
    if missing:
      raise errors.CheckpointError(
          f"{directory}: adapters.safetensors lacks {missing[:3]}.")
    leaves = iter(jax.numpy.asarray(tensors[n]) for n in item["leaves"])
    tree = _fill(item["treedef"], leaves)
    table.setdefault(item["site"], []).append(Adapter(
        tree, _resolve(item["fn"]), tuple(item["inputs"]),
        tuple((k, v) for k, v in item["options"]), item["kind"]))
  out = dict(split(params)[0])
  out[ADAPTERS_KEY] = {k: tuple(v) for k, v in table.items()}
  return out
