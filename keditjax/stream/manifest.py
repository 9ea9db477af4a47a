"""Tamper-evident edit manifests: what an edited checkpoint declares.

`save_edited` writes an edited model as

  directory/
    config.json, model.safetensors, tokenizer*   the weights (`models.save`)
    adapters.json, adapters.safetensors          its adapters, when it has any
    manifest.json       the base model's fingerprint, every operation (an
                        apply call or a rollback) in order with its records,
                        hyper-parameters and declared deltas, and every
                        tensor's sha256 after editing
    deltas.safetensors  the declared deltas' arrays: the factors `u`, `v` of
                        a low-rank edit (W' = W + u @ v), or `after - before`
                        for a leaf edited without factors
    manifest.sig        with a key: HMAC-SHA256 (and Ed25519 with a
                        `cryptography` Ed25519 key) over manifest.json's bytes
                        and deltas.safetensors' sha256

A manifest is immutable and built next to the editing:

  manifest = Manifest.start(model)
  params, state, info = editor.apply(model, model.params, requests, state)
  manifest = manifest.with_apply(editor, info, model.params, params)
  save_edited("out", model, params, manifest, key=b"secret")

`keditjax.stream.verify.verify` replays the declared deltas on the base
model and reports every change they do not explain.

Tensor names are parameter paths ("layers_2/mlp/down_proj/kernel"); adapter
leaves are "adapters/{site}#{order}:{kind}/{leaf}". A tensor's sha256 is over
its little-endian bytes as float32 (floating leaves, bfloat16 included) or
int64 (integer leaves: GRACE labels are 31-bit crc32 values, which float32
would round).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import re
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base
from keditjax.models import adapters as adapters_lib
from keditjax.models import hf

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DELTAS = "deltas.safetensors"
SIGNATURE = "manifest.sig"
ADAPTER_PREFIX = "adapters/"
_LAYER = re.compile(r"(?:^|/)(?:layer/|[A-Za-z]+_)(\d+)(?:/|#|$)")


# -- fingerprints --------------------------------------------------------------

def adapter_name(site: str, order: int, kind: str) -> str:
  """The name prefix of the adapter `order` at `site`."""
  return f"{ADAPTER_PREFIX}{site}#{order}:{kind}"


def tensors(params) -> dict[str, Any]:
  """Tensor name -> leaf for every weight and adapter leaf of `params`."""
  weights, table = adapters_lib.split(params)
  out = dict(hf.flatten(weights))
  for site in sorted(table):
    for order, adapter in enumerate(table[site]):
      prefix = adapter_name(site, order, adapter.kind)
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          adapter.params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out[prefix + "/" + "/".join(keys)] = leaf
  return out


def layer_of(name: str) -> int | None:
  """The layer index in a tensor or site name, or None (embeddings, ...)."""
  match = _LAYER.search(name)
  return int(match.group(1)) if match else None


def _canonical(leaf) -> np.ndarray:
  array = np.asarray(leaf)
  if jnp.issubdtype(array.dtype, jnp.floating):
    return np.ascontiguousarray(array, "<f4")
  return np.ascontiguousarray(array, "<i8")


def tensor_sha256(leaf) -> str:
  """sha256 of one leaf's canonical bytes (see the module docstring)."""
  return hashlib.sha256(_canonical(leaf).tobytes()).hexdigest()


def fingerprint(params) -> dict[str, str]:
  """Tensor name -> sha256 hex of every weight and adapter leaf."""
  return {name: tensor_sha256(leaf) for name, leaf in tensors(params).items()}


def combined_digest(hashes: Mapping[str, str]) -> str:
  """One sha256 over the sorted `name:sha256` lines of a fingerprint."""
  lines = "".join(f"{name}:{hashes[name]}\n" for name in sorted(hashes))
  return hashlib.sha256(lines.encode()).hexdigest()


def describe(params) -> dict:
  """A manifest's fingerprint section: per-tensor sha256, shape and dtype,
  and the combined digest."""
  flat = tensors(params)
  hashes = {n: tensor_sha256(leaf) for n, leaf in flat.items()}
  return {"sha256": combined_digest(hashes), "tensors": hashes,
          "shapes": {n: list(np.shape(leaf)) for n, leaf in flat.items()},
          "dtypes": {n: str(np.asarray(leaf).dtype)
                     for n, leaf in flat.items()}}


def plain_json(x):
  """A JSON-able copy of hyper-parameters and configs (tuples become lists,
  arrays nested lists, anything else its repr)."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: plain_json(getattr(x, f.name))
            for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {str(k): plain_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain_json(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return repr(x)


def delta_sha256(arrays) -> str:
  """sha256 over the arrays' float32 bytes, in order: `LeafDelta.to_json`'s
  digest of its factors."""
  return base.LeafDelta((), tuple(arrays)).to_json()["sha256"]


# -- the manifest --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeclaredDelta:
  """A declared change of one tensor.

  Attributes:
    tensor: the parameter path ("layers_2/mlp/down_proj/kernel").
    form: "factored" (`u @ v`) or "dense" (the change itself).
    arrays: the arrays' names in the deltas file (`u`, `v` or one).
    shapes: their shapes.
    sha256: sha256 over their float32 bytes, in order.
    record: the edit record's id (None: the whole call's dense change).
  """
  tensor: str
  form: str
  arrays: tuple
  shapes: tuple
  sha256: str
  record: str | None = None

  def to_json(self) -> dict:
    return {"tensor": self.tensor, "form": self.form,
            "arrays": list(self.arrays),
            "shapes": [list(s) for s in self.shapes], "sha256": self.sha256,
            "record": self.record}


@dataclasses.dataclass(frozen=True)
class DeclaredEntry:
  """A declared adapter entry (`AdapterEntry` without its contents)."""
  site: str
  kind: str
  index: int
  action: str
  record: str | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Operation:
  """One apply call or rollback.

  Attributes:
    kind: "apply" or "rollback".
    method: the editor's name ("rollback" for a rollback).
    time: UTC ISO-8601 time.
    hparams: the editor's hyper-parameters as JSON.
    records: `EditRecord.to_json()` of each record of the call.
    deltas: `DeclaredDelta`s, in the order they were applied.
    adapters: `DeclaredEntry`s.
    undoes: a rollback's edit id.
    mode: a rollback's mode ("subtract", "adapter", "restore", "rebuild").
  """
  kind: str
  method: str
  time: str
  hparams: Any = None
  records: tuple = ()
  deltas: tuple = ()
  adapters: tuple = ()
  undoes: str | None = None
  mode: str | None = None

  def to_json(self) -> dict:
    return {"kind": self.kind, "method": self.method, "time": self.time,
            "hparams": self.hparams, "records": list(self.records),
            "deltas": [d.to_json() for d in self.deltas],
            "adapters": [e.to_json() for e in self.adapters],
            "undoes": self.undoes, "mode": self.mode}

  @classmethod
  def from_json(cls, data: Mapping) -> "Operation":
    return cls(data["kind"], data["method"], data["time"], data.get("hparams"),
               tuple(data.get("records", ())),
               tuple(DeclaredDelta(d["tensor"], d["form"], tuple(d["arrays"]),
                                   tuple(tuple(s) for s in d["shapes"]),
                                   d["sha256"], d.get("record"))
                     for d in data.get("deltas", ())),
               tuple(DeclaredEntry(e["site"], e["kind"], int(e["index"]),
                                   e["action"], e.get("record"))
                     for e in data.get("adapters", ())),
               data.get("undoes"), data.get("mode"))


def _utc(time) -> str:
  if time is None:
    time = datetime.datetime.now(datetime.timezone.utc)
  elif isinstance(time, (int, float)):
    time = datetime.datetime.fromtimestamp(time, datetime.timezone.utc)
  if isinstance(time, datetime.datetime):
    return time.astimezone(datetime.timezone.utc).isoformat(timespec="seconds")
  if isinstance(time, str):
    return time
  raise errors.InputError(
      f"time={time!r}; give a datetime, POSIX seconds or an ISO string.")


def _check_params(what: str, params) -> None:
  if not isinstance(params, Mapping):
    raise errors.InputError(
        f"{what} must be a parameter pytree (a dict), got "
        f"{type(params).__name__}.")


def _dense(before, after, path) -> np.ndarray:
  return (np.asarray(base.get_leaf(after, path), np.float32)
          - np.asarray(base.get_leaf(before, path), np.float32))


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What an edited checkpoint declares (see the module docstring).

  Attributes:
    model: {"name": ..., "config": the Hugging Face config dict or None}.
    base: the base model's fingerprint section (`describe`).
    operations: `Operation`s, in order.
    after: every tensor's fingerprint after editing (set by `save_edited`).
    arrays: delta array name -> float32 array (read-only; saved beside the
      JSON, which holds only their names and hashes).
    format_version: `FORMAT_VERSION`.
  """
  model: Mapping
  base: Mapping
  operations: tuple = ()
  after: Mapping | None = None
  arrays: Mapping = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}), repr=False,
      compare=False)
  format_version: int = FORMAT_VERSION

  # -- building ----------------------------------------------------------------
  @classmethod
  def start(cls, model, base_params=None) -> "Manifest":
    """An empty manifest for `model` (a model object, or a name) whose base
    weights are `base_params` (default the model's own)."""
    if isinstance(model, str):
      name, config = model, None
    else:
      name = getattr(model, "name", type(model).__name__)
      config = getattr(model, "config", None)
      if base_params is None:
        base_params = getattr(model, "params", None)
    _check_params("base_params", base_params)
    if config is not None:
      from keditjax.models.config import to_hf_config
      config = plain_json(to_hf_config(config))
    return cls({"name": str(name), "config": config}, describe(base_params))

  def _extended(self, operation: Operation, arrays: Mapping) -> "Manifest":
    merged = dict(self.arrays)
    for name, array in arrays.items():
      array = np.array(array, np.float32)
      array.flags.writeable = False
      merged[name] = array
    return dataclasses.replace(
        self, operations=self.operations + (operation,), after=None,
        arrays=types.MappingProxyType(merged))

  def with_apply(self, editor, info, before, after, time=None) -> "Manifest":
    """The manifest plus one apply call.

    Args:
      editor: the editor (its `name` and `hparams` are recorded).
      info: the call's `EditInfo` (its records say what was written).
      before: the params the call edited.
      after: the params it returned.
      time: when (default now, UTC).

    Returns:
      A new manifest; factored `LeafDelta`s declare their factors, leaves
      recorded without factors declare `after - before` (once per call).

    Raises:
      InputError: no records, or params that are not pytrees.
    """
    _check_params("before", before)
    _check_params("after", after)
    records = list(getattr(info, "records", None) or ())
    if not records:
      raise errors.InputError(
          "info has no edit records; a manifest can only declare what an "
          "editor recorded.")
    index = len(self.operations)
    deltas, entries, dense_paths, arrays = [], [], {}, {}
    for record in records:
      for t in record.touched:
        if isinstance(t, base.AdapterEntry):
          entries.append(DeclaredEntry(t.site, t.kind, int(t.index), t.action,
                                       record.id))
          continue
        path = tuple(t.path)
        shape = np.shape(base.get_leaf(after, path))
        factors = None
        if t.factors is not None:
          u, v = (np.asarray(f, np.float32) for f in t.factors)
          if u.ndim == 2 and v.ndim == 2 and (
              u.shape[0], v.shape[1]) == tuple(shape) and (
                  u.shape[1] == v.shape[0]):
            factors = (u, v)
        if factors is None:  # declared as the call's dense change
          dense_paths.setdefault(path, record.id)
          continue
        names = (f"{index}/{len(deltas)}/u", f"{index}/{len(deltas)}/v")
        arrays.update(zip(names, factors))
        deltas.append(DeclaredDelta("/".join(path), "factored", names,
                                    tuple(f.shape for f in factors),
                                    delta_sha256(factors), record.id))
    for path, record_id in dense_paths.items():
      delta = _dense(before, after, path)
      name = f"{index}/{len(deltas)}/dense"
      arrays[name] = delta
      deltas.append(DeclaredDelta(
          "/".join(path), "dense", (name,), (delta.shape,),
          delta_sha256([delta]), record_id if len(records) == 1 else None))
    hparams = plain_json(getattr(editor, "hparams", None))
    operation = Operation("apply", str(getattr(editor, "name", "editor")),
                          _utc(time), hparams,
                          tuple(r.to_json() for r in records), tuple(deltas),
                          tuple(entries))
    return self._extended(operation, arrays)

  def with_rollback(self, edit_id: str, before, after, mode: str,
                    time=None) -> "Manifest":
    """The manifest plus one rollback of edit `edit_id`.

    "subtract" declares the negated factors of the edit's factored deltas;
    "adapter" declares its adapter entries removed; any other mode
    ("restore", "rebuild") declares `after - before` of every weight leaf
    that changed and every adapter slot that changed. (A rebuild can also
    be written as `prefix(n)` plus the re-applied calls.)

    Raises:
      InputError: an edit id the manifest does not hold, or a mode it
        cannot declare (subtract without factors, adapter without entries).
    """
    _check_params("before", before)
    _check_params("after", after)
    applies = [op for op in self.operations if op.kind == "apply"]
    own_deltas = [d for op in applies for d in op.deltas
                  if d.record == edit_id]
    own_entries = [e for op in applies for e in op.adapters
                   if e.record == edit_id]
    if not own_deltas and not own_entries and not any(
        r.get("id") == edit_id for op in self.operations
        for r in op.records):
      raise errors.InputError(f"edit {edit_id!r} is not in this manifest.")
    index = len(self.operations)
    deltas, entries, arrays = [], [], {}
    if mode == "subtract":
      factored = [d for d in own_deltas if d.form == "factored"]
      if not factored:
        raise errors.InputError(
            f"edit {edit_id!r} has no factored delta to subtract.")
      for d in factored:
        if any(n not in self.arrays for n in d.arrays):
          raise errors.InputError(
              f"the arrays of edit {edit_id!r}'s delta on {d.tensor} are not "
              "in this manifest (load it with load_manifest).")
        u, v = (np.asarray(self.arrays[n]) for n in d.arrays)
        factors = (-u, v)
        names = (f"{index}/{len(deltas)}/u", f"{index}/{len(deltas)}/v")
        arrays.update(zip(names, factors))
        deltas.append(DeclaredDelta(d.tensor, "factored", names, d.shapes,
                                    delta_sha256(factors), edit_id))
    elif mode == "adapter":
      if not own_entries:
        raise errors.InputError(
            f"edit {edit_id!r} wrote no adapter entries to remove.")
      entries = [DeclaredEntry(e.site, e.kind, e.index, "remove", edit_id)
                 for e in own_entries]
    else:
      before_flat, after_flat = hf.flatten(adapters_lib.split(before)[0]), (
          hf.flatten(adapters_lib.split(after)[0]))
      for name in sorted(after_flat):
        old, new = before_flat.get(name), after_flat[name]
        if old is new or (old is not None and np.array_equal(
            np.asarray(old), np.asarray(new))):
          continue
        if old is None:
          raise errors.InputError(
              f"rollback {mode!r} added tensor {name!r}; nothing to declare "
              "it against.")
        delta = np.asarray(new, np.float32) - np.asarray(old, np.float32)
        array = f"{index}/{len(deltas)}/dense"
        arrays[array] = delta
        deltas.append(DeclaredDelta(name, "dense", (array,), (delta.shape,),
                                    delta_sha256([delta]), edit_id))
      entries = [DeclaredEntry(e.site, e.kind, e.index, "remove", edit_id)
                 for e in own_entries]
      entries += [DeclaredEntry(site, kind, slot, "update", edit_id)
                  for site, kind, slot in changed_adapter_slots(before, after)]
    operation = Operation("rollback", "rollback", _utc(time), None, (),
                          tuple(deltas), tuple(entries), edit_id, str(mode))
    return self._extended(operation, arrays)

  def prefix(self, n_operations: int) -> "Manifest":
    """The manifest of the first `n_operations` operations (a rollback that
    rebuilds from a checkpoint continues from here)."""
    if not 0 <= int(n_operations) <= len(self.operations):
      raise errors.InputError(
          f"n_operations={n_operations}; this manifest has "
          f"{len(self.operations)} operations.")
    kept = self.operations[:int(n_operations)]
    names = {n for op in kept for d in op.deltas for n in d.arrays}
    return dataclasses.replace(
        self, operations=kept, after=None, arrays=types.MappingProxyType(
            {n: a for n, a in self.arrays.items() if n in names}))

  # -- JSON --------------------------------------------------------------------
  def to_json(self) -> dict:
    """The JSON view (arrays by name and hash only)."""
    return {"format_version": self.format_version, "model": dict(self.model),
            "base": dict(self.base),
            "operations": [op.to_json() for op in self.operations],
            "after": None if self.after is None else dict(self.after)}

  @classmethod
  def from_json(cls, data: Mapping, arrays: Mapping | None = None,
                source: str = "manifest") -> "Manifest":
    """The inverse of `to_json`.

    Raises:
      VerifyError: another format version, or fields missing.
    """
    if not isinstance(data, Mapping):
      raise errors.VerifyError(f"{source}: not a JSON object.")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
      raise errors.VerifyError(
          f"{source}: format_version={version!r}; this keditjax reads "
          f"version {FORMAT_VERSION}.")
    try:
      return cls(dict(data["model"]), dict(data["base"]),
                 tuple(Operation.from_json(op) for op in data["operations"]),
                 data.get("after"),
                 types.MappingProxyType(dict(arrays or {})), version)
    except (KeyError, TypeError, ValueError) as e:
      raise errors.VerifyError(
          f"{source}: malformed manifest ({type(e).__name__}: {e}).") from None


def changed_adapter_slots(before, after) -> list:
  """(site, kind, slot) of every adapter slot that differs between two
  params pytrees (slot axis first, as every keditjax adapter keeps it)."""
  _, old_table = adapters_lib.split(before)
  _, new_table = adapters_lib.split(after)
  out = []
  for site in sorted(new_table):
    for adapter in new_table[site]:
      old = next((a for a in old_table.get(site, ()) if a.kind == adapter.kind),
                 None)
      slots, _ = slot_changes(old, adapter)
      out += [(site, adapter.kind, s) for s in sorted(slots or ())]
  return out


def slot_changes(old, new) -> tuple[dict | None, float]:
  """Which slots of adapter `new` differ from `old` (None: no adapter, its
  slots count as zeros, as `adapters.grow` pads them).

  Returns:
    ({slot: Frobenius norm of its change}, norm of the whole change); the
    dict is None when the leaves share no leading slot axis (the adapter
    then counts as changed as a whole when the norm is > 0).
  """
  flat = lambda a: {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                    jax.tree_util.tree_flatten_with_path(a.params)[0]}
  new_leaves, old_leaves = flat(new), ({} if old is None else flat(old))
  caps = {x.shape[0] if x.ndim else None for x in new_leaves.values()}
  cap = caps.pop() if len(caps) == 1 and None not in caps else None
  if cap is not None:
    norm2_S, changed_S = np.zeros(cap), np.zeros(cap, bool)
  total2 = 0.0
  for key, x in new_leaves.items():
    y = old_leaves.get(key)
    if y is None:
      y = np.zeros_like(x)
    elif x.ndim and y.ndim == x.ndim and y.shape[1:] == x.shape[1:] and (
        y.shape[0] <= x.shape[0]):
      y = np.concatenate([y, np.zeros((x.shape[0] - y.shape[0],)
                                      + x.shape[1:], y.dtype)])
    elif y.shape != x.shape:
      y = np.zeros_like(x)
    diff2 = np.square(x.astype(np.float64) - y.astype(np.float64))
    total2 += float(diff2.sum())
    if cap is not None:
      norm2_S += diff2.reshape(cap, -1).sum(axis=1)
      changed_S |= (x != y).reshape(cap, -1).any(axis=1)
  slots = None if cap is None else {
      int(i): float(np.sqrt(norm2_S[i])) for i in np.flatnonzero(changed_S)}
  return slots, float(np.sqrt(total2))


# -- signatures ----------------------------------------------------------------

def _ed25519():
  try:
    from cryptography.hazmat.primitives.asymmetric import ed25519
  except ImportError:
    return None
  return ed25519


def _message(manifest_bytes: bytes, deltas_bytes: bytes) -> bytes:
  return (b"keditjax-manifest-v1\n" + manifest_bytes + b"\n" +
          hashlib.sha256(deltas_bytes).hexdigest().encode())


def _hmac_key(key) -> bytes | None:
  if isinstance(key, str):
    key = key.encode()
  if isinstance(key, (bytes, bytearray)):
    if not key:
      raise errors.InputError("the signing key is empty.")
    return bytes(key)
  ed = _ed25519()
  if ed is not None and isinstance(key, (ed.Ed25519PrivateKey,
                                         ed.Ed25519PublicKey)):
    return None
  raise errors.InputError(
      f"key must be bytes or str (HMAC-SHA256) or a cryptography Ed25519 key, "
      f"got {type(key).__name__}.")


def check_key(key) -> None:
  """Raises `InputError` for a key `sign`/`check_signature` cannot use."""
  _hmac_key(key)


def sign(manifest_bytes: bytes, deltas_bytes: bytes, key) -> dict:
  """The signature file's contents: {"hmac_sha256": hex} for a bytes/str
  key, {"ed25519": hex, "public_key": hex} for an Ed25519 private key."""
  message = _message(manifest_bytes, deltas_bytes)
  secret = _hmac_key(key)
  if secret is not None:
    return {"hmac_sha256": hmac.new(secret, message,
                                    hashlib.sha256).hexdigest()}
  ed = _ed25519()
  if not isinstance(key, ed.Ed25519PrivateKey):
    raise errors.InputError("signing needs the Ed25519 private key.")
  return {"ed25519": key.sign(message).hex(),
          "public_key": key.public_key().public_bytes_raw().hex()}


def check_signature(manifest_bytes: bytes, deltas_bytes: bytes, key,
                    signature: Mapping | None) -> str | None:
  """None when `signature` matches, else why not (never raises for a
  tampered file)."""
  if not isinstance(signature, Mapping):
    return f"no readable {SIGNATURE}: the checkpoint is not signed"
  message = _message(manifest_bytes, deltas_bytes)
  secret = _hmac_key(key)
  if secret is not None:
    want = hmac.new(secret, message, hashlib.sha256).hexdigest()
    got = signature.get("hmac_sha256")
    if not isinstance(got, str) or not hmac.compare_digest(want, got):
      return ("the HMAC-SHA256 signature does not match: manifest.json or "
              "deltas.safetensors was modified, or the key differs")
    return None
  ed = _ed25519()
  public = key.public_key() if isinstance(key, ed.Ed25519PrivateKey) else key
  try:
    public.verify(bytes.fromhex(signature.get("ed25519", "")), message)
  except Exception:  # InvalidSignature, or a malformed hex string
    return ("the Ed25519 signature does not match: manifest.json or "
            "deltas.safetensors was modified, or the key differs")
  return None


def read_key(path: str):
  """A key file: a PEM Ed25519 key when `cryptography` is installed, else
  the file's bytes (trailing whitespace stripped) as an HMAC key."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise errors.InputError(
        f"cannot read the key file {path!r} ({e}).") from None
  if data.startswith(b"-----BEGIN"):
    if _ed25519() is None:
      raise errors.InputError(
          f"{path} holds a PEM key; Ed25519 signatures need the "
          "'cryptography' package (pip install cryptography), or use an "
          "HMAC key file (any bytes).")
    from cryptography.hazmat.primitives import serialization
    loader = (serialization.load_pem_public_key if b"PUBLIC" in data[:40]
              else lambda d: serialization.load_pem_private_key(d, None))
    return loader(data)
  return data.rstrip()


# -- files ---------------------------------------------------------------------

def _write_bytes(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def canonical_bytes(data: Mapping) -> bytes:
  """The manifest.json bytes for a JSON dict (sorted keys, one layout)."""
  return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()


def save_edited(directory: str, model, params, manifest: Manifest, *,
                key=None, overwrite: bool = False) -> Manifest:
  """Writes an edited checkpoint with its manifest (module docstring).

  Args:
    directory: where to write.
    model: the model (config and tokenizer).
    params: the edited params (adapters included).
    manifest: the manifest of the edits that made `params`.
    key: signs the manifest when given: bytes/str (HMAC-SHA256) or a
      `cryptography` Ed25519 private key.
    overwrite: replace an existing checkpoint.

  Returns:
    The manifest as written (with `after` set to `params`' fingerprint).
  """
  from safetensors.numpy import save as save_tensors
  from keditjax import models
  if not isinstance(manifest, Manifest):
    raise errors.InputError(
        f"manifest must be a Manifest, got {type(manifest).__name__}.")
  _check_params("params", params)
  if key is not None:
    check_key(key)  # a bad key fails before anything is written
  manifest = dataclasses.replace(manifest, after=describe(params))
  models.save(model, directory, params, overwrite=overwrite,
              format="keditjax")
  deltas_bytes = save_tensors({n: np.ascontiguousarray(a, np.float32)
                               for n, a in manifest.arrays.items()})
  data = dict(manifest.to_json(), deltas_file={
      "name": DELTAS, "sha256": hashlib.sha256(deltas_bytes).hexdigest()})
  manifest_bytes = canonical_bytes(data)
  _write_bytes(os.path.join(directory, DELTAS), deltas_bytes)
  _write_bytes(os.path.join(directory, MANIFEST), manifest_bytes)
  sig_path = os.path.join(directory, SIGNATURE)
  if key is not None:
    _write_bytes(sig_path, canonical_bytes(
        sign(manifest_bytes, deltas_bytes, key)))
  elif os.path.exists(sig_path):  # a stale signature would mislead
    os.remove(sig_path)
  return manifest


def read_files(directory: str) -> tuple[bytes, bytes | None]:
  """manifest.json's and deltas.safetensors' bytes (None: no deltas file).

  Raises:
    VerifyError: no directory or no manifest.json.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise errors.VerifyError(f"{directory!r} is not a directory.")
  if not os.path.exists(path):
    raise errors.VerifyError(
        f"{directory}: no {MANIFEST}; it was not written by "
        "keditjax.stream.manifest.save_edited, so its edits cannot be "
        "verified.")
  with open(path, "rb") as f:
    manifest_bytes = f.read()
  deltas_path = os.path.join(directory, DELTAS)
  deltas_bytes = None
  if os.path.exists(deltas_path):
    with open(deltas_path, "rb") as f:
      deltas_bytes = f.read()
  return manifest_bytes, deltas_bytes


def parse(manifest_bytes: bytes, source: str) -> dict:
  """manifest.json's dict, with its format version checked.

  Raises:
    VerifyError: invalid JSON or another format version.
  """
  try:
    data = json.loads(manifest_bytes)
  except ValueError as e:
    raise errors.VerifyError(f"{source}: invalid JSON ({e}).") from None
  Manifest.from_json(data, source=source)  # checks the version and fields
  return data


def load_arrays(deltas_bytes: bytes | None) -> dict:
  """The deltas file's arrays ({} when absent).

  Raises:
    VerifyError: a file safetensors cannot read.
  """
  if deltas_bytes is None:
    return {}
  from safetensors.numpy import load as load_tensors
  try:
    return dict(load_tensors(deltas_bytes))
  except Exception as e:  # safetensors raises its own error types
    raise errors.VerifyError(f"{DELTAS}: unreadable ({e}).") from None


def load_manifest(directory: str) -> Manifest:
  """The manifest saved in `directory`, with its delta arrays.

  Raises:
    VerifyError: no manifest, invalid JSON, another format version, an
      unreadable deltas file.
  """
  manifest_bytes, deltas_bytes = read_files(directory)
  source = os.path.join(directory, MANIFEST)
  data = parse(manifest_bytes, source)
  return Manifest.from_json(data, load_arrays(deltas_bytes), source)
