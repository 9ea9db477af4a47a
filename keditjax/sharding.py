"""Data and Megatron-style model parallelism with `jax.jit` and named meshes.

A mesh has two axes, `("data", "model")`. Parameters are placed by *rules*:
`(regex, PartitionSpec)` pairs matched with `re.search` against the
"a/b/c" path of each leaf; the first match wins and unmatched leaves are
replicated. Column-parallel projections (q/k/v, MLP in) split their output
dimension over "model", row-parallel ones (attention out, MLP out) their
input dimension, and embeddings their vocabulary (Shoeybi et al. 2019,
Megatron-LM, Sec. 3). A dimension the mesh axis does not divide is replicated
instead, so any rule fits any model. XLA's partitioner (GSPMD) inserts the
collectives, so results equal the single-device ones up to rounding.

Batches are split over "data". A batch the data axis does not divide is
padded (by repeating its last row) and the outputs sliced back, so callers
never see the padding; only patching `Sites` with an indivisible batch raises
`ShardingError` (their values may carry a batch dimension we cannot pad).

Editors take a `shard_model` model as any other: their jitted passes run on
the sharded params (GSPMD), every leaf they write keeps its layout
(`editors.base.replace_leaves`), and the key statistics run on the model's
mesh, so a model too large for one device is edited in place.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from keditjax import errors
from keditjax.models import adapters as adapters_lib
from keditjax.models import lm, registry
from keditjax.models import sites as sites_lib
from keditjax.models.config import ModelConfig

AXES = ("data", "model")
_COL, _ROW, _VEC = P(None, "model"), P("model", None), P("model")

DEFAULT_RULES = (
    # Llama / Mistral / Qwen2 (keditjax.models.llama).
    (r"layers_\d+/self_attn/(q|k|v)_proj/kernel$", _COL),
    (r"layers_\d+/self_attn/(q|k|v)_proj/bias$", _VEC),
    (r"layers_\d+/self_attn/o_proj/kernel$", _ROW),
    (r"layers_\d+/mlp/(gate|up)_proj/kernel$", _COL),
    (r"layers_\d+/mlp/(gate|up)_proj/bias$", _VEC),
    (r"layers_\d+/mlp/down_proj/kernel$", _ROW),
    (r"(^|/)embed_tokens/embedding$", _ROW),
    # GPT-2 (fused q/k/v in c_attn).
    (r"h_\d+/attn/c_attn/kernel$", _COL),
    (r"h_\d+/attn/c_attn/bias$", _VEC),
    (r"h_\d+/attn/c_proj/kernel$", _ROW),
    (r"h_\d+/mlp/c_fc/kernel$", _COL),
    (r"h_\d+/mlp/c_fc/bias$", _VEC),
    (r"h_\d+/mlp/c_proj/kernel$", _ROW),
    (r"(^|/)wte/embedding$", _ROW),
    # GPT-J.
    (r"h_\d+/attn/(q|k|v)_proj/kernel$", _COL),
    (r"h_\d+/attn/out_proj/kernel$", _ROW),
    (r"h_\d+/mlp/fc_in/kernel$", _COL),
    (r"h_\d+/mlp/fc_in/bias$", _VEC),
    (r"h_\d+/mlp/fc_out/kernel$", _ROW),
    # Untied LM heads (Llama, Qwen2, GPT-J): vocabulary-parallel.
    (r"(^|/)lm_head/kernel$", _COL),
    (r"(^|/)lm_head/bias$", _VEC),
)


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
  """A `("data", "model")` mesh with automatic (GSPMD) axis types.

  Args:
    data: data-parallel size; None uses every device `model` leaves.
    model: model-parallel (tensor-parallel) size.
    devices: explicit devices, used in order (all of them); default: all.

  Returns:
    A `jax.sharding.Mesh` of shape `(data, model)`.

  Raises:
    ShardingError: the shape is not positive or does not fit the devices.
  """
  pool = list(jax.devices() if devices is None else devices)
  if data is None:
    if model < 1 or len(pool) % model:
      raise errors.ShardingError(
          f"model={model} does not divide the {len(pool)} devices; with "
          "data=None it must be a positive divisor of the device count.")
    data = len(pool) // model
  if data < 1 or model < 1 or data * model > len(pool) or (
      devices is not None and data * model != len(pool)):
    raise errors.ShardingError(
        f"mesh (data={data}, model={model}) needs {data * model} devices, "
        f"but {len(pool)} are {'given' if devices is not None else 'available'}"
        "; choose data * model dividing (or, without `devices`, at most) "
        f"{len(pool)}.")
  auto = (AxisType.Auto, AxisType.Auto)  # let GSPMD propagate shardings
  if devices is not None:
    return Mesh(np.array(pool).reshape(data, model), AXES, axis_types=auto)
  return jax.make_mesh((data, model), AXES, auto, devices=pool)


def parse_mesh(spec: str) -> tuple[int, int]:
  """`"DATAxMODEL"` (a launcher's `--mesh`, e.g. "2x4") -> `(data, model)`.

  Raises:
    ShardingError: not two positive integers joined by "x".
  """
  match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
  if not match or min(int(g) for g in match.groups()) < 1:
    raise errors.ShardingError(
        f"mesh={spec!r}: use DATAxMODEL with two positive integers, e.g. "
        "'2x4' (2-way data, 4-way model parallel) or '8x1'.")
  return int(match[1]), int(match[2])


def mesh_from_flag(spec: str | None) -> Mesh | None:
  """The mesh a launcher's `--mesh=DATAxMODEL` asks for (None: no flag).

  Raises:
    ShardingError: a malformed spec, or a shape the devices do not fit.
  """
  if spec is None or not str(spec).strip():
    return None
  return make_mesh(*parse_mesh(spec))


def fit_spec(spec: P, shape, mesh: Mesh, path: str = "") -> P:
  """`spec` with every dimension its mesh axes do not divide replicated."""
  if len(spec) > len(shape):
    raise errors.ShardingError(
        f"rule {spec} for {path!r} has {len(spec)} dimensions; the parameter "
        f"has shape {tuple(shape)}.")
  fitted = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[name] for name in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def match_rule(path: str, rules=DEFAULT_RULES) -> P:
  """The spec of the first rule whose regex `re.search`es `path`, else P()."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return spec
  return P()


def _path_str(key_path) -> str:
  """(DictKey("a"), GetAttrKey("b"), SequenceKey(0)) -> "a/b/0"."""
  parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
           for k in key_path)
  return "/".join(map(str, parts))


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
  """A `NamedSharding` for every leaf of `params` (same tree structure).

  Args:
    params: parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
    mesh: the mesh.
    rules: `(regex, PartitionSpec)` pairs; first match wins.

  Returns:
    A pytree of `NamedSharding`s shaped like `params`.
  """
  def one(key_path, leaf):
    path = _path_str(key_path)
    spec = fit_spec(match_rule(path, rules), np.shape(leaf), mesh, path)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh, rules=DEFAULT_RULES):
  """`params` placed on `mesh` by `rules` (a new pytree of sharded arrays)."""
  return jax.device_put(params, param_shardings(params, mesh, rules))


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Splits dimension 0 (the batch) over "data": `P("data", None, ...)`."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


@dataclasses.dataclass(frozen=True)
class ShardedForward:
  """`lm.forward` jitted with explicit in/out shardings on a mesh.

  Call it as `lm.forward` minus the config: `(params, tokens_BxL,
  attention_mask_BxL=None, positions_BxL=None, sites=NO_SITES) -> (logits,
  captures)`. `jitted` is the underlying `jax.jit` function (batch must be
  divisible by the data axis there) and `param_shardings` its param layout.
  """
  config: ModelConfig
  mesh: Mesh
  param_shardings: Any
  jitted: Callable

  def __call__(self, params, tokens_BxL, attention_mask_BxL=None,
               positions_BxL=None, sites=sites_lib.NO_SITES):
    # Adapters ride in `sites`, replicated (a codebook is small next to the
    # weights); the weights keep the layout of `param_shardings`.
    params, adapters = adapters_lib.split(params)
    sites = sites.with_adapters(adapters)
    batch = tokens_BxL.shape[0]
    pad = -batch % self.mesh.shape["data"]
    if pad and jax.tree.leaves((sites.patches, sites.capture_positions)):
      raise errors.ShardingError(
          f"batch {batch} is not divisible by the data axis "
          f"({self.mesh.shape['data']}) and sites are patched; use a batch "
          "that is a multiple of the data axis.")
    grow = lambda x: None if x is None else jnp.pad(
        jnp.asarray(x), ((0, pad), (0, 0)), mode="edge")
    logits, out = self.jitted(params, grow(tokens_BxL),
                              grow(attention_mask_BxL), grow(positions_BxL),
                              sites)
    if pad:
      logits, out = jax.tree.map(lambda x: x[:batch], (logits, out))
    return logits, out


def sharded_forward(config: ModelConfig, mesh: Mesh,
                    rules=DEFAULT_RULES) -> ShardedForward:
  """The model's forward pass, jitted to run sharded on `mesh`.

  Args:
    config: the model config.
    mesh: a `make_mesh` mesh.
    rules: parameter placement rules.

  Returns:
    A `ShardedForward`: params follow `rules`, token batches and captures
    are split over "data", logits over ("data", -, "model" if it divides the
    vocabulary). Params on other devices are moved; shard them once with
    `shard_params` (or `ShardedForward.param_shardings`) to avoid that.
  """
  module = registry.get_arch(config.arch).module(config)
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  params_sh = param_shardings(shapes["params"], mesh, rules)
  batch = data_sharding(mesh, 2)
  logits_sh = NamedSharding(mesh, fit_spec(
      P("data", None, "model"), (mesh.shape["data"], 1, config.vocab_size),
      mesh))

  def run(params, tokens_BxL, mask_BxL, positions_BxL, sites):
    return lm.forward(config, params, tokens_BxL, mask_BxL, positions_BxL,
                      sites)

  jitted = jax.jit(
      run, in_shardings=(params_sh, batch, batch, batch,
                         NamedSharding(mesh, P())),
      out_shardings=(logits_sh, NamedSharding(mesh, P("data"))))
  return ShardedForward(config, mesh, params_sh, jitted)


class ShardedLanguageModel(lm.LanguageModel):
  """A `LanguageModel` whose params live on a mesh.

  `apply` and `score` run the sharded forward (batches split over "data");
  `generate` runs the ordinary jitted decoder on the sharded params, and XLA
  propagates their shardings. Editors take it as any model: the leaves they
  write keep their shardings (`editors.base.keep_sharding`) and statistics
  run on `mesh` (`editors.rome.stats_placement`).
  """

  def __init__(self, model: lm.LanguageModel, mesh: Mesh, rules=DEFAULT_RULES):
    self.mesh = mesh
    self.forward = sharded_forward(model.config, mesh, rules)
    params = jax.device_put(model.params, self.forward.param_shardings)
    super().__init__(model.config, params, model.tokenizer, model.name)

  def _forward(self, params, tokens_BxL, attention_mask_BxL=None,
               positions_BxL=None, sites=sites_lib.NO_SITES):
    return self.forward(params, tokens_BxL, attention_mask_BxL, positions_BxL,
                        sites)


def shard_model(model: lm.LanguageModel, mesh: Mesh,
                rules=DEFAULT_RULES) -> ShardedLanguageModel:
  """`model` with its params sharded on `mesh` and a sharded `apply`.

  Args:
    model: a loaded `LanguageModel` (left unchanged).
    mesh: a `make_mesh` mesh.
    rules: parameter placement rules.

  Returns:
    A `ShardedLanguageModel`; `.forward` is its `ShardedForward`.
  """
  return ShardedLanguageModel(model, mesh, rules)
