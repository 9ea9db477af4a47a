"""Saving and restoring editor states (orbax, through `training.checkpoint`).

An editor state is a registered pytree dataclass of arrays plus static
metadata (STYLE.md §11), so it saves like any other pytree:

  state_io.save_state(directory, editor, model, state)
  state = state_io.load_state(directory, editor, model)   # any process

`directory` then holds

  - `arrays/`: the state's array leaves, written by the repository's one
    orbax module (`keditjax.training.checkpoint`), as one flat dict;
  - `editor_state.json`: the method name, its hyper-parameters, a
    fingerprint of the model (sha256 of its `ModelConfig` as JSON) and the
    state's *skeleton*: its dataclasses, static fields, dict keys and each
    array's shape and dtype.

`load_state` checks the method, hyper-parameters and model before reading
any array, rebuilds the abstract tree from the skeleton (so a new process
needs neither the `init` inputs nor the state they made) and restores the
arrays against it, dtypes included (a float64 covariance stays float64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from typing import Any

import jax
import numpy as np

from keditjax import errors

_JSON = "editor_state.json"
_ARRAYS = "arrays"


def _plain(x):
  """JSON-able form of hyper-parameters and model configs."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return repr(x)


def model_fingerprint(model) -> str:
  """sha256 of the model's config fields as sorted JSON."""
  config = json.dumps(_plain(model.config), sort_keys=True)
  return hashlib.sha256(config.encode()).hexdigest()


def _static_to_json(value):
  if isinstance(value, tuple):
    return {"tuple": [_static_to_json(v) for v in value]}
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  raise errors.InputError(
      f"static state metadata {value!r} ({type(value).__name__}) cannot be "
      "saved; use tuples of strings and numbers.")


def _static_from_json(value):
  if isinstance(value, dict):
    return tuple(_static_from_json(v) for v in value["tuple"])
  return value


def _skeleton(node, leaves: list):
  """A JSON description of `node`; array leaves are appended to `leaves`."""
  if node is None:
    return None
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    cls = type(node)
    fields = {}
    for f in dataclasses.fields(node):
      value = getattr(node, f.name)
      if f.metadata.get("static"):
        fields[f.name] = {"static": _static_to_json(value)}
      else:
        fields[f.name] = {"data": _skeleton(value, leaves)}
    return {"dataclass": f"{cls.__module__}:{cls.__qualname__}",
            "fields": fields}
  if isinstance(node, dict):
    bad = [k for k in node if not isinstance(k, str)]
    if bad:
      raise errors.InputError(
          f"state dict keys must be strings to be saved; got {bad[:3]}.")
    return {"dict": {k: _skeleton(v, leaves) for k, v in node.items()}}
  if isinstance(node, (tuple, list)):
    return {"tuple": [_skeleton(v, leaves) for v in node]}
  if isinstance(node, (np.ndarray, jax.Array, np.generic)):
    leaves.append(node)
    return {"array": {"shape": list(np.shape(node)),
                      "dtype": np.dtype(node.dtype).name,
                      "index": len(leaves) - 1}}
  raise errors.InputError(
      f"an editor state holds a {type(node).__name__}; only arrays, dicts, "
      "tuples, None and registered dataclasses can be saved.")


def _build(skel, leaves: dict):
  """The inverse of `_skeleton`, with arrays taken from `leaves[index]`."""
  if skel is None:
    return None
  if "dataclass" in skel:
    module, name = skel["dataclass"].split(":")
    if not module.startswith("keditjax."):
      raise errors.CheckpointError(
          f"an editor state of class {skel['dataclass']} is not keditjax's.")
    cls = importlib.import_module(module)
    for part in name.split("."):
      cls = getattr(cls, part)
    kwargs = {}
    for field, entry in skel["fields"].items():
      kwargs[field] = (_static_from_json(entry["static"]) if "static" in entry
                       else _build(entry["data"], leaves))
    return cls(**kwargs)
  if "dict" in skel:
    return {k: _build(v, leaves) for k, v in skel["dict"].items()}
  if "tuple" in skel:
    return tuple(_build(v, leaves) for v in skel["tuple"])
  return leaves[str(skel["array"]["index"])]


def _arrays_like(skel, out: dict) -> dict:
  """`{index: empty array}` for every array of the skeleton."""
  if isinstance(skel, dict):
    if "array" in skel:
      a = skel["array"]
      out[str(a["index"])] = np.empty(a["shape"], np.dtype(a["dtype"]))
    else:
      for value in skel.values():
        _arrays_like(value, out)
  elif isinstance(skel, list):
    for value in skel:
      _arrays_like(value, out)
  return out


def _meta(editor, model) -> dict:
  return {"method": editor.name,
          "hparams": _plain(dataclasses.asdict(editor.hparams)),
          "model_fingerprint": model_fingerprint(model)}


def save_state(directory: str, editor, model, state) -> str:
  """Writes `state` of `editor` for `model` under `directory`.

  Args:
    directory: created if missing; an earlier state there is replaced.
    editor: the editor that made `state`.
    model: the model it was made for.
    state: the editor state (a registered pytree dataclass).

  Returns:
    The path of the JSON description.

  Raises:
    InputError: the state holds something that is not an array or static
      metadata.
  """
  from keditjax.training import checkpoint  # pylint: disable=import-outside-toplevel
  leaves = []
  meta = dict(_meta(editor, model), skeleton=_skeleton(state, leaves))
  os.makedirs(directory, exist_ok=True)
  arrays = {str(i): leaf for i, leaf in enumerate(leaves)}
  ckpt = checkpoint.Checkpointer(os.path.join(directory, _ARRAYS), every=1,
                                 keep=1)
  try:
    if arrays:
      ckpt.save(0, arrays, {"method": meta["method"],
                            "model_fingerprint": meta["model_fingerprint"]},
                force=True)
  finally:
    ckpt.close()
  path = os.path.join(directory, _JSON)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  return path


def read_meta(directory: str) -> dict:
  """The JSON description `save_state` wrote.

  Raises:
    CheckpointError: none there, or unreadable.
  """
  path = os.path.join(directory, _JSON)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(
        f"no readable editor state in {directory} ({e}); write one with "
        "keditjax.editors.state_io.save_state.") from e


def load_state(directory: str, editor, model):
  """The state `save_state` wrote under `directory`, for `editor` and `model`.

  Raises:
    CheckpointError: no state there, or one saved for another method,
      other hyper-parameters or another model (checked before any array is
      read), or unreadable arrays.
  """
  meta = read_meta(directory)
  want = _meta(editor, model)
  if meta.get("method") != want["method"]:
    raise errors.CheckpointError(
        f"the editor state in {directory} was saved for method "
        f"{meta.get('method')!r}; this editor is {want['method']!r}.")
  if meta.get("model_fingerprint") != want["model_fingerprint"]:
    raise errors.CheckpointError(
        f"the {want['method']} state in {directory} was saved for another "
        f"model (fingerprint {str(meta.get('model_fingerprint'))[:12]}, this "
        f"model's is {want['model_fingerprint'][:12]}).")
  if meta.get("hparams") != want["hparams"]:
    diff = sorted(k for k in set(meta.get("hparams") or {}) | set(
        want["hparams"]) if (meta.get("hparams") or {}).get(k) !=
                  want["hparams"].get(k))
    raise errors.CheckpointError(
        f"the {want['method']} state in {directory} was saved with other "
        f"hyper-parameters (differing fields: {diff}).")
  return _restore(directory, meta["skeleton"], {
      "method": want["method"], "model_fingerprint": want["model_fingerprint"]})


def _restore(directory: str, skeleton, expect: dict):
  """The tree of `skeleton` with its arrays read from `directory/arrays`."""
  from keditjax.training import checkpoint  # pylint: disable=import-outside-toplevel
  like = _arrays_like(skeleton, {})
  arrays = {}
  if like:
    ckpt = checkpoint.Checkpointer(os.path.join(directory, _ARRAYS), every=1,
                                   keep=1)
    try:
      step = ckpt.latest_step()
      if step is None:
        raise errors.CheckpointError(
            f"{directory}/{_ARRAYS} holds no saved arrays.")
      arrays, _ = ckpt.restore(step, like, expect=expect)
    finally:
      ckpt.close()
  return _build(skeleton, arrays)


def save_tree(directory: str, tree, meta: dict) -> None:
  """Writes any pytree of arrays, dicts, tuples and keditjax dataclasses
  (an editor state, a params delta) with JSON `meta` under `directory`;
  `load_tree` reads it back in any process."""
  from keditjax.training import checkpoint  # pylint: disable=import-outside-toplevel
  leaves = []
  skeleton = _skeleton(tree, leaves)
  os.makedirs(directory, exist_ok=True)
  if leaves:
    ckpt = checkpoint.Checkpointer(os.path.join(directory, _ARRAYS), every=1,
                                   keep=1)
    try:
      ckpt.save(0, {str(i): x for i, x in enumerate(leaves)}, {}, force=True)
    finally:
      ckpt.close()
  path = os.path.join(directory, "tree.json")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump({"meta": meta, "skeleton": skeleton}, f, sort_keys=True)
    os.replace(path + ".tmp", path)


def load_tree(directory: str) -> tuple[Any, dict]:
  """`(tree, meta)` that `save_tree` wrote.

  Raises:
    CheckpointError: nothing readable there.
  """
  try:
    with open(os.path.join(directory, "tree.json")) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(
        f"no readable saved tree in {directory} ({e}).") from e
  return _restore(directory, saved["skeleton"], {}), saved["meta"]


__all__ = ["load_state", "load_tree", "model_fingerprint", "read_meta",
           "save_state", "save_tree"]
