"""A live model: reads are served while edits arrive, with rollback.

  live = LiveModel(model, keditjax.editors.get("memit"))
  with live:                                   # a writer thread starts
    future = live.submit({"prompt": "{} plays", "subject": "Messi",
                          "target_new": "tennis"})
    live.score(["Messi plays"], ["tennis"])    # before or after: never a mix
    edit = future.result()                     # an `AppliedEdit`
    live.rollback(edit.id)

Params are an immutable pytree (editors never mutate them), so a write is
"build the new pytree, then swap one reference": a reader takes
`live.snapshot()` once and computes with it, and sees the params of exactly
one version. Writers are serialised by a lock; the queue's worker groups
pending requests into micro-batches for editors that edit a batch at once
(`MethodSpec.batches`: MEMIT, AlphaEdit, UltraEdit, ...), waiting at most
`latency_budget_s` after the first one arrived, and applies the others one by
one. A request the editor refuses (a `keditjax` error) fails only its own
future; the others of its batch are retried alone, and the loop keeps
serving. Params are untouched by a refused request.

Rollback (`LiveModel.rollback`), by mode:
  "restore"   the most recent operation undone by putting back the params
              (and editor state) from before it: bit-exact.
  "adapter"   GRACE / T-Patcher / WISE entries removed by the editor's own
              `remove` (exact: the adapter then computes what it would
              without those entries; WISE refuses when a later edit
              changed the same shard).
  "subtract"  a weight edit's declared factors subtracted, W - u @ v. Later
              edits were computed on weights that held it, so the result
              is not "never made": the edit's own prompt returns close to
              its pre-edit score, others keep theirs (docs: RESULTS.md).
  "rebuild"   exact "never made": the params of the last checkpoint, then
              every later edit re-applied in its original grouping,
              without the rolled-back one (as slow as those edits were).
  "auto"      restore when it is the last operation, else adapter for
              adapter edits, subtract for factored weight edits, rebuild
              for the rest (fine-tuning, hypernetworks: no factors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import itertools
import json
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax import editors as editors_lib
from keditjax.editors import base
from keditjax.stream import manifest as manifest_lib

ROLLBACK_MODES = ("auto", "restore", "adapter", "subtract", "rebuild")


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """What a reader sees: one version of the params.

  Attributes:
    params: the parameter pytree (never mutated).
    version: how many operations (edit batches, rollbacks) made it.
    edit_ids: the live edits it holds, in the order they were applied.
  """
  params: Any
  version: int
  edit_ids: tuple = ()


@dataclasses.dataclass(frozen=True)
class AppliedEdit:
  """One request as the live model applied it.

  Attributes:
    id: the loop's id for it ("e000017"), stable across a rebuild.
    request: the validated `Request`.
    record: the editor's `EditRecord` (what it wrote; replaced on rebuild).
    operation: the index of the operation that applied it (its batch).
    batch_size: requests written by that operation.
    arrived: `time.time()` when it was submitted.
    visible: `time.time()` when readers could first see it.
  """
  id: str
  request: Any
  record: Any
  operation: int
  batch_size: int
  arrived: float
  visible: float

  @property
  def latency_s(self) -> float:
    """Seconds from arrival until readers saw it."""
    return self.visible - self.arrived


@dataclasses.dataclass(frozen=True)
class Refusal:
  """A request the loop did not apply, and why."""
  request: Any
  error: str
  arrived: float


@dataclasses.dataclass(frozen=True)
class _Operation:
  """An apply call or a rollback, in the order they happened."""
  kind: str                 # "apply" or "rollback"
  edit_ids: tuple
  requests: tuple = ()      # apply: the requests, in order
  mode: str = ""            # rollback: how


class LiveModel:
  """A model that serves reads while it is being edited.

  Args:
    model: the `LanguageModel` (or classifier) to edit.
    editor: an `Editor` (`keditjax.editors.get(...)`).
    params: the starting params (default the model's).
    state: the editor state (default `editor.init(model, params,
      **init_inputs)`).
    init_inputs: keyword inputs for `editor.init`.
    max_batch: most requests per micro-batch (editors that batch).
    latency_budget_s: how long the worker waits after a batch's first
      request for more to join it (editors that batch).
    on_change: called as `on_change(kind, snapshot, info)` after every
      swap, in the writer's thread.
    track_manifest: keep an edit manifest (`keditjax.stream.manifest`) of
      every operation, for `save` and `verify`. It holds each operation's
      declared deltas: factors for ROME/MEMIT/AlphaEdit (rank one per
      request and layer) and UltraEdit (a request's token rows: rank = its
      tokens), the whole changed leaves for methods without factors
      (fine-tuning, hypernetworks: memory grows by those leaves per
      operation).
  """

  def __init__(self, model, editor, *, params=None, state=None,
               init_inputs=None, max_batch: int = 8,
               latency_budget_s: float = 0.5,
               on_change: Callable | None = None,
               track_manifest: bool = True):
    if int(max_batch) < 1:
      raise errors.ConfigError(f"max_batch={max_batch} must be >= 1.")
    if not (isinstance(latency_budget_s, (int, float)) and
            math.isfinite(latency_budget_s) and latency_budget_s >= 0):
      raise errors.ConfigError(
          f"latency_budget_s={latency_budget_s!r} must be a finite number "
          ">= 0.")
    self.model = model
    self.editor = editor
    spec = editors_lib.METHODS.get(getattr(editor, "name", None))
    self.batches = bool(spec.batches) if spec is not None else False
    self.max_batch = int(max_batch) if self.batches else 1
    self.latency_budget_s = float(latency_budget_s)
    self.on_change = on_change
    params = model.params if params is None else params
    if state is None:
      state = editor.init(model, params, **dict(init_inputs or {}))
    self._snapshot = Snapshot(params, 0, ())
    self._state = state
    self.manifest = (manifest_lib.Manifest.start(model, params)
                     if track_manifest else None)
    # Rebuilds start from here: (params, state, operations so far,
    # manifest).
    self._checkpoint = (params, state, 0, self.manifest)
    # (params, state, manifest) before the last operation, when it was an
    # apply.
    self._previous = None
    self._operations: list[_Operation] = []
    self._edits: dict[str, AppliedEdit] = {}
    self._rolled_back: set[str] = set()
    self._ids = itertools.count()
    self._write_lock = threading.RLock()
    self._queue: queue.Queue = queue.Queue()
    self._worker: threading.Thread | None = None
    self.refusals: list[Refusal] = []
    self.internal_errors = 0

  # -- reads -----------------------------------------------------------------
  def snapshot(self) -> Snapshot:
    """The current version (one reference read: atomic)."""
    return self._snapshot

  @property
  def params(self):
    return self._snapshot.params

  @property
  def state(self):
    return self._state

  @property
  def edits(self) -> dict:
    """Live edits: id -> `AppliedEdit` (rolled-back ones are removed)."""
    return dict(self._edits)

  def score(self, prompts, targets, *, snapshot: Snapshot | None = None):
    """Teacher-forced log P(target | prompt) (summed over target tokens)
    under one snapshot (default the current one)."""
    snap = self._snapshot if snapshot is None else snapshot
    return self.model.score(snap.params, list(prompts),
                            [t if t.startswith(" ") else " " + t
                             for t in targets])

  def generate(self, prompt, *, snapshot: Snapshot | None = None, **kwargs):
    """Greedy (or sampled) continuation under one snapshot."""
    snap = self._snapshot if snapshot is None else snapshot
    return self.model.generate(snap.params, prompt, **kwargs)

  # -- writes ------------------------------------------------------------------
  def edit(self, requests, *, arrived: float | None = None) -> list:
    """Applies `requests` now, as one operation (one `apply` call).

    Args:
      requests: one request or a list (dicts or `Request`s).
      arrived: when they arrived (default now), for latency.

    Returns:
      One `AppliedEdit` per request.

    Raises:
      KeditError: the editor refused them (params unchanged), or a
        non-finite change (the edit diverged; params unchanged).
    """
    arrived = time.time() if arrived is None else arrived
    validated = base.make_requests(requests)
    with self._write_lock:
      snap = self._snapshot
      new_params, new_state, info = self.editor.apply(
          self.model, snap.params, list(validated), self._state)
      _check_finite(info)
      manifest = self._declare(self.manifest, info, snap.params, new_params)
      ids = tuple(f"e{next(self._ids):06d}" for _ in validated)
      op = len(self._operations)
      self._operations.append(_Operation("apply", ids, tuple(validated)))
      self._previous = (snap.params, self._state, self.manifest)
      self._state = new_state
      self.manifest = manifest
      visible_ids = snap.edit_ids + ids
      new_snap = Snapshot(new_params, snap.version + 1, visible_ids)
      self._snapshot = new_snap   # the swap: readers see it from here
      visible = time.time()
      records = list(info.records) or [None] * len(ids)
      applied = [AppliedEdit(i, r, rec, op, len(ids), arrived, visible)
                 for i, r, rec in zip(ids, validated, records)]
      for a in applied:
        self._edits[a.id] = a
      if self.on_change is not None:
        self.on_change("apply", new_snap, dict(info=info, applied=applied,
                                               before=snap.params))
    return applied

  def checkpoint(self) -> None:
    """Makes the current params the base that "rebuild" rollbacks start
    from (edits before it can then only be subtracted or removed)."""
    with self._write_lock:
      self._checkpoint = (self._snapshot.params, self._state,
                          len(self._operations), self.manifest)

  def fork(self) -> "LiveModel":
    """A second live model at this one's current version.

    It shares the (immutable) params, editor state, manifest, checkpoint
    and edit history, then is edited and rolled back on its own: e.g. to
    compare rollback modes from one edited state. It has no worker thread
    and no `on_change`; edit ids continue where this one's stand.
    """
    with self._write_lock:
      other = LiveModel(self.model, self.editor, params=self.params,
                        state=self._state, max_batch=self.max_batch,
                        latency_budget_s=self.latency_budget_s,
                        track_manifest=False)
      other._snapshot, other.manifest = self._snapshot, self.manifest
      other._checkpoint, other._previous = self._checkpoint, self._previous
      other._operations = list(self._operations)
      other._edits, other._rolled_back = dict(self._edits), set(
          self._rolled_back)
      next_id = next(self._ids)
      self._ids = itertools.count(next_id)
      other._ids = itertools.count(next_id)
    return other

  def rollback(self, edit_id: str, mode: str = "auto") -> Snapshot:
    """Takes one edit out (see the module docstring for the modes).

    Args:
      edit_id: an `AppliedEdit.id`.
      mode: one of `ROLLBACK_MODES`.

    Returns:
      The new snapshot.

    Raises:
      InputError: an unknown or already rolled-back id, or a mode that
        cannot undo this edit (e.g. "subtract" without factors, "restore"
        when it is not the last operation).
    """
    if mode not in ROLLBACK_MODES:
      raise errors.ConfigError(
          f"rollback mode {mode!r}; use one of {ROLLBACK_MODES}.")
    with self._write_lock:
      if edit_id not in self._edits:
        state = ("was already rolled back" if edit_id in self._rolled_back
                 else "is not a live edit")
        raise errors.InputError(f"edit {edit_id!r} {state}.")
      edit = self._edits[edit_id]
      mode = self._choose_mode(edit, mode)
      snap = self._snapshot
      manifest = self.manifest
      if mode == "restore":
        params, state, manifest = self._previous
      elif mode == "adapter":
        params, state = self._remove_adapters(snap.params, edit), self._state
      elif mode == "subtract":
        params, state = _subtract(snap.params, edit.record), self._state
      if mode in ("adapter", "subtract") and manifest is not None:
        manifest = manifest.with_rollback(edit.record.id, snap.params, params,
                                          mode)
      if mode == "rebuild":
        params, state, manifest = self._rebuild(edit)
      self._rolled_back.add(edit_id)
      del self._edits[edit_id]
      self.manifest = manifest
      self._operations.append(_Operation("rollback", (edit_id,), mode=mode))
      self._previous = None   # "restore" undoes an apply, not a rollback
      self._state = state
      new_snap = Snapshot(params, snap.version + 1,
                          tuple(i for i in snap.edit_ids if i != edit_id))
      self._snapshot = new_snap
      if self.on_change is not None:
        self.on_change("rollback", new_snap, dict(edit=edit, mode=mode,
                                                  before=snap.params))
    return new_snap

  def _choose_mode(self, edit: AppliedEdit, mode: str) -> str:
    last_apply = (self._previous is not None and
                  self._operations[-1].edit_ids == (edit.id,))
    touched = tuple(edit.record.touched) if edit.record is not None else ()
    adapter = bool(touched) and all(
        isinstance(t, base.AdapterEntry) for t in touched)
    factored = bool(touched) and all(
        isinstance(t, base.LeafDelta) and t.factors is not None
        for t in touched)
    in_last = (self._previous is not None and
               edit.operation == len(self._operations) - 1)
    if mode == "auto":
      if last_apply:
        return "restore"
      if in_last:  # one of the last batch: re-apply the rest of it
        return "rebuild"
      if adapter:
        return "adapter"
      return "subtract" if factored else "rebuild"
    if mode == "restore" and not last_apply:
      raise errors.InputError(
          f"edit {edit.id!r} is not the last operation on its own; "
          "'restore' undoes only that (use 'subtract', 'adapter' or "
          "'rebuild').")
    if mode == "adapter" and not adapter:
      raise errors.InputError(
          f"edit {edit.id!r} ({self.editor.name}) wrote no adapter entries.")
    if mode == "subtract" and not factored:
      raise errors.InputError(
          f"edit {edit.id!r} ({self.editor.name}) has no factored delta to "
          "subtract; use 'rebuild'.")
    if mode == "rebuild" and not in_last and (
        edit.operation < self._checkpoint[2]):
      raise errors.InputError(
          f"edit {edit.id!r} is older than the last checkpoint; it can "
          "only be subtracted or removed.")
    return mode

  def _remove_adapters(self, params, edit: AppliedEdit):
    spec = editors_lib.METHODS[self.editor.name]
    remove = getattr(importlib.import_module(spec.module), "remove", None)
    if remove is None:
      raise errors.InputError(f"{self.editor.name} cannot remove entries.")
    return remove(params, self.editor.hparams, [edit.record])

  def _rebuild(self, edit: AppliedEdit):
    """The params as if `edit` had never been made: from the params before
    its operation when that was the last one (the rest of its batch
    re-applied), else from the checkpoint with every later apply re-run in
    its original grouping, without rolled-back edits."""
    last = len(self._operations) - 1
    if edit.operation == last and self._previous is not None:
      (params, state, manifest), start = self._previous, last
    else:
      params, state, start, manifest = self._checkpoint
    records = {}
    for op in self._operations[start:]:
      if op.kind != "apply":
        continue
      keep = [(i, r) for i, r in zip(op.edit_ids, op.requests)
              if i != edit.id and i not in self._rolled_back]
      if not keep:
        continue
      new_params, state, info = self.editor.apply(
          self.model, params, [r for _, r in keep], state)
      _check_finite(info)
      manifest = self._declare(manifest, info, params, new_params)
      params = new_params
      for (i, _), record in zip(keep, info.records or [None] * len(keep)):
        records[i] = record
    # Only now that every re-apply succeeded do the records change.
    for i, record in records.items():
      self._edits[i] = dataclasses.replace(self._edits[i], record=record)
    return params, state, manifest

  def _declare(self, manifest, info, before, after):
    """`manifest` plus one apply call (None when not tracking)."""
    if manifest is None:
      return None
    return manifest.with_apply(self.editor, info, before, after)

  def save(self, directory: str, *, key=None, overwrite: bool = False) -> str:
    """Saves the current params with their manifest
    (`keditjax.stream.manifest.save_edited`; `key` signs it) and returns
    `directory`.

    Raises:
      ConfigError: the live model does not track a manifest.
    """
    with self._write_lock:
      if self.manifest is None:
        raise errors.ConfigError(
            "this LiveModel was made with track_manifest=False; it has no "
            "manifest to save.")
      self.manifest = manifest_lib.save_edited(
          directory, self.model, self._snapshot.params, self.manifest,
          key=key, overwrite=overwrite)   # now with its `after` hashes
    return directory

  # -- the queue -----------------------------------------------------------------
  def submit(self, request) -> concurrent.futures.Future:
    """Queues one request for the worker; its future resolves to the
    `AppliedEdit`, or raises why it was refused. Never raises itself.

    A list or tuple is a group: its requests are applied together in one
    operation (all or none), and the future resolves to their
    `AppliedEdit`s."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((request, future, time.time()))
    return future

  def feed(self, source: Iterable) -> list:
    """Submits every item of `source` (e.g. `follow_jsonl(...)`)."""
    return [self.submit(item) for item in source]

  def start(self) -> "LiveModel":
    """Starts the writer thread (idempotent)."""
    if self._worker is None or not self._worker.is_alive():
      self._worker = threading.Thread(target=self._work, daemon=True,
                                      name="keditjax-live-writer")
      self._worker.start()
    return self

  def stop(self, timeout: float | None = None) -> None:
    """Applies what is queued, then stops the writer thread."""
    if self._worker is not None:
      self._queue.put(None)
      self._worker.join(timeout)
      self._worker = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def _work(self):
    stopping = False
    while not stopping:
      item = self._queue.get()
      if item is None:
        return
      batch = [item]
      deadline = item[2] + self.latency_budget_s
      while len(batch) < self.max_batch:
        wait = deadline - time.time()
        try:
          nxt = self._queue.get(timeout=wait) if wait > 0 else (
              self._queue.get_nowait())
        except queue.Empty:
          break
        if nxt is None:
          stopping = True
          break
        batch.append(nxt)
      self._apply_batch(batch)

  def _refuse(self, request, future, arrived, error) -> None:
    self._count_internal(error)
    self.refusals.append(Refusal(request, f"{type(error).__name__}: {error}",
                                 arrived))
    future.set_exception(error)

  def _apply_batch(self, batch) -> None:
    """Applies a micro-batch; a refused request fails only itself."""
    ready = []
    for request, future, arrived in batch:
      if isinstance(request, errors.KeditError):  # e.g. a bad JSONL line
        self._refuse(request, future, arrived, request)
      elif isinstance(request, (list, tuple)):     # a group: on its own
        self._apply_group(request, future, arrived)
      else:
        try:
          ready.append((base.make_request(request), future, arrived))
        except Exception as e:  # pylint: disable=broad-except
          self._refuse(request, future, arrived, e)
    if len(ready) > 1:
      try:
        applied = self.edit([r for r, _, _ in ready],
                            arrived=min(a for _, _, a in ready))
      except Exception:  # pylint: disable=broad-except
        pass            # retried one by one: a bad request fails alone
      else:
        for (_, future, arrived), a in zip(ready, applied):
          future.set_result(dataclasses.replace(a, arrived=arrived))
        return
    for request, future, arrived in ready:
      try:
        (applied,) = self.edit([request], arrived=arrived)
      except Exception as e:  # pylint: disable=broad-except
        self._refuse(request, future, arrived, e)
      else:
        future.set_result(applied)

  def _apply_group(self, requests, future, arrived) -> None:
    try:
      future.set_result(self.edit(list(requests), arrived=arrived))
    except Exception as e:  # pylint: disable=broad-except
      self._refuse(requests, future, arrived, e)

  def _count_internal(self, error) -> None:
    if not isinstance(error, errors.KeditError):
      self.internal_errors += 1


def _check_finite(info) -> None:
  """Refuses an edit whose change is NaN or infinite (it diverged)."""
  for path, entry in (info.changed or {}).items():
    norm = entry.get("delta_norm")
    if norm is not None and not math.isfinite(norm):
      raise errors.InputError(
          f"the edit changed {path} by a non-finite amount (it diverged); "
          "not applied.")


def _subtract(params, record):
  """`params` with the record's factored deltas taken out: W - u @ v."""
  updates = {}
  for t in record.touched:
    u, v = (np.asarray(f, np.float32) for f in t.factors)
    path = tuple(t.path)
    w = updates.get(path, base.get_leaf(params, path))
    delta = jnp.asarray(u @ v, jnp.float32)
    if delta.shape != w.shape:
      raise errors.InputError(
          f"record {record.id}: factors of shape {u.shape} @ {v.shape} do "
          f"not fit {'/'.join(path)} {w.shape}.")
    updates[path] = (w.astype(jnp.float32) - delta).astype(w.dtype)
  return base.replace_leaves(params, updates)


def follow_jsonl(path: str, *, poll_s: float = 0.2,
                 stop: threading.Event | None = None,
                 idle_timeout_s: float | None = None) -> Iterator:
  """Yields the records of a JSONL file as it grows (never writes to it).

  A line that is not valid JSON yields an `InputError` instance instead of
  a record (the loop refuses it and keeps going); a partial last line
  waits for its newline.

  Args:
    path: the file (it may not exist yet).
    poll_s: seconds between looks at a file that has not grown.
    stop: an event that ends the iteration.
    idle_timeout_s: end after this long without a new line (None: never).
  """
  offset, idle_since, pending = 0, time.time(), b""
  while stop is None or not stop.is_set():
    grew = False
    if os.path.exists(path):
      with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
      offset += len(chunk)
      pending += chunk
      *lines, pending = pending.split(b"\n")
      for line in lines:
        grew = True
        if not line.strip():
          continue
        try:
          yield json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          yield errors.InputError(f"{path}: a line is not JSON ({e}).")
    if grew:
      idle_since = time.time()
    elif idle_timeout_s is not None and time.time() - idle_since > (
        idle_timeout_s):
      return
    else:
      time.sleep(poll_s)
