"""Hugging Face checkpoints: declarative import tables, safetensors, export.

`tensors_to_params` applies an architecture's table (HF name template ->
our parameter path + transform, maxtext style) and refuses any tensor it
cannot map, any parameter left missing and any shape that does not fit.
`params_to_tensors` runs the same table backwards for export. torch is never
needed: tensors are read with `safetensors` into numpy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import registry
from keditjax.models.config import ModelConfig, from_hf_config, to_hf_config

Params = Any


def _compile_table(table):
  """Turns `{l}` templates into (hf_regex, path_template, our_regex, hf_template, transform)."""
  rows = []
  for hf_name, path, transform in table:
    hf_re = re.compile("^" + re.escape(hf_name).replace(r"\{l\}", r"(?P<l>\d+)") + "$")
    our_re = re.compile("^" + re.escape(path).replace(r"\{l\}", r"(?P<l>\d+)") + "$")
    rows.append((hf_re, path, our_re, hf_name, transform))
  return rows


def _transform(array, transform):
  return np.ascontiguousarray(array.T) if transform == "T" else array


def abstract_params(config: ModelConfig):
  """The parameter tree's shapes and dtypes, without allocating it."""
  module = registry.get_arch(config.arch).module(config)
  tokens = jnp.zeros((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))
  return variables["params"]


def flatten(params) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  flat = {}
  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict):
        walk(value, path)
      else:
        flat[path] = value
  walk(params, "")
  return flat


def unflatten(flat: dict[str, Any]) -> dict:
  """{"a/b/c": leaf} -> nested dict."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def tensors_to_params(config: ModelConfig, tensors, *, dtype=np.float32,
                      source: str = "checkpoint", place=None) -> dict:
  """Maps HF-named tensors to a keditjax parameter tree.

  Args:
    config: the model config.
    tensors: HF tensor name -> array, or an iterable of `(name, array)`
      pairs (consumed once: a streaming loader's tensors are dropped as soon
      as they are mapped).
    dtype: parameter dtype.
    source: a name for error messages (the file or directory).
    place: called on each mapped leaf (e.g. `jax.device_put`, so that only
      the placed copy is kept); None keeps numpy arrays.

  Returns:
    The nested-dict parameter pytree (numpy arrays, or what `place` returns).

  Raises:
    CheckpointError: an unmapped tensor, a missing parameter, a shape mismatch.
  """
  arch = registry.get_arch(config.arch)
  rows = _compile_table(arch.hf_table)
  ignore = [re.compile(p) for p in arch.hf_ignore]
  expected = flatten(abstract_params(config))
  flat = {}
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  for name, array in items:
    if any(p.match(name) for p in ignore):
      continue
    if config.tie_word_embeddings and name == "lm_head.weight":
      continue  # tied: the head is the embedding.
    for hf_re, path, _, _, transform in rows:
      match = hf_re.match(name)
      if match:
        path = path.format(**match.groupdict())
        break
    else:
      raise errors.CheckpointError(
          f"{source}: tensor {name!r} has no mapping in the {config.arch} "
          "import table (an unsupported variant or a corrupt checkpoint).")
    if path not in expected:
      raise errors.CheckpointError(
          f"{source}: tensor {name!r} maps to {path!r}, which the "
          f"{config.arch} config does not have (check config.json).")
    # Placed leaves are copied by `place`; numpy leaves are our own copy.
    value = _transform(np.asarray(array), transform).astype(
        dtype, copy=place is None)
    if not np.all(np.isfinite(value)):
      raise errors.CheckpointError(
          f"{source}: tensor {name!r} holds NaN or infinite values.")
    if tuple(value.shape) != tuple(expected[path].shape):
      raise errors.CheckpointError(
          f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
          f"expected {tuple(expected[path].shape)} for {path!r}.")
    flat[path] = value if place is None else place(value)
    del array, value  # a streamed tensor is freed before the next one
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise errors.CheckpointError(
        f"{source}: parameters missing from the checkpoint: {missing[:8]}"
        + (" ..." if len(missing) > 8 else ""))
  return unflatten(flat)


def params_to_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """The inverse of `tensors_to_params`: HF-named float32 numpy tensors."""
  rows = _compile_table(registry.get_arch(config.arch).hf_table)
  out = {}
  for path, leaf in flatten(params).items():
    for _, _, our_re, hf_template, transform in rows:
      match = our_re.match(path)
      if match:
        name = hf_template.format(**match.groupdict())
        out[name] = _transform(np.asarray(leaf, np.float32), transform)
        break
    else:
      raise errors.CheckpointError(
          f"parameter {path!r} has no Hugging Face name in the {config.arch} "
          "table; cannot export.")
  return out


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """Reads `model.safetensors` or a sharded `model.safetensors.index.json`.

  Raises:
    CheckpointError: no weights file, a missing shard, or a corrupt file.
  """
  return dict(iter_safetensors(directory))


def iter_safetensors(directory: str):
  """`read_safetensors` as `(name, float32 array)` pairs, one at a time.

  The files are checked before the first pair; a tensor is read only when
  the iterator reaches it.
  """
  from safetensors import safe_open
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise errors.CheckpointError(f"{index}: unreadable shard index ({e}).") from None
    files = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    raise errors.CheckpointError(
        f"{directory}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported).")
  paths = [os.path.join(directory, name) for name in files]
  for path in paths:
    if not os.path.exists(path):
      raise errors.CheckpointError(f"{path}: shard listed in the index is missing.")
  return _iter_files(paths)


def _iter_files(paths):
  from safetensors import safe_open
  for path in paths:
    try:
      # framework="flax" reads bfloat16 too, which numpy cannot represent.
      with safe_open(path, framework="flax") as f:
        keys = list(f.keys())
        for key in keys:
          value = np.asarray(f.get_tensor(key).astype(jnp.float32))
          yield key, value
    except errors.KeditError:
      raise
    except Exception as e:  # safetensors raises its own error types.
      raise errors.CheckpointError(
          f"{path}: corrupt or truncated safetensors file ({e}).") from None


def resolve_directory(name_or_path: str) -> str:
  """A local directory for `name_or_path`, downloading hub ids when needed.

  Raises:
    ModelNotFoundError: not a directory and not downloadable.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or (
      name_or_path.count("/") != 1):
    raise errors.ModelNotFoundError(
        f"{name_or_path!r} is not a model directory (and not a hub id "
        "'owner/name').")
  try:
    import huggingface_hub
    return huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["config.json", "*.safetensors",
                                      "*.safetensors.index.json",
                                      "tokenizer*", "vocab*", "merges.txt",
                                      "special_tokens_map.json"])
  except Exception as e:
    raise errors.ModelNotFoundError(
        f"Could not download {name_or_path!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}).") from None


def read_config(directory: str, *, strict: bool = True) -> ModelConfig:
  """Parses `directory/config.json` into a `ModelConfig`."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise errors.ModelNotFoundError(
        f"{directory}: no config.json; a Hugging Face model directory needs "
        "config.json and model.safetensors.")
  try:
    with open(path) as f:
      hf = json.load(f)
  except ValueError as e:
    raise errors.CheckpointError(f"{path}: invalid JSON ({e}).") from None
  return from_hf_config(hf, strict=strict)


def load_hf(name_or_path: str, *, strict: bool = True, dtype=np.float32):
  """Loads a Hugging Face checkpoint: `(config, params, directory)`."""
  directory = resolve_directory(name_or_path)
  config = read_config(directory, strict=strict)
  params = tensors_to_params(config, iter_safetensors(directory), dtype=dtype,
                             source=directory, place=jax.device_put)
  return config, params, directory


def save_hf(directory: str, config: ModelConfig, params, tokenizer=None, *,
            overwrite: bool = False) -> str:
  """Exports params as a Hugging Face directory transformers can load.

  Writes `config.json`, `model.safetensors` and, if given, the tokenizer
  (`tokenizer.json` + `tokenizer_config.json`). Refuses to overwrite an
  existing checkpoint unless `overwrite=True`.

  Returns:
    The directory.
  """
  from safetensors.numpy import save_file
  if isinstance(params, dict) and "adapters" in params:
    raise errors.CheckpointError(
        f"params carry adapters at {sorted(params['adapters'])}; the Hugging "
        "Face format cannot hold them (use models.save(..., "
        "format='keditjax')).")
  if os.path.exists(os.path.join(directory, "config.json")) and not overwrite:
    raise errors.CheckpointError(
        f"{directory} already holds a checkpoint; pass overwrite=True or pick "
        "another directory.")
  tensors = params_to_tensors(config, params)
  for name, array in tensors.items():
    if not np.all(np.isfinite(array)):
      raise errors.CheckpointError(f"refusing to export non-finite tensor {name!r}.")
  os.makedirs(directory, exist_ok=True)
  hf = to_hf_config(config)
  hf["torch_dtype"] = "float32"
  tmp = os.path.join(directory, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(directory)
  return directory
