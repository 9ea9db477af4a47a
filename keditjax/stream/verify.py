"""Checks an edited checkpoint against its base model and its manifest.

  report = verify(base_model.params, "edited/", key=b"secret")
  print(report.summary())
  report.ok        # False: something changed that the manifest does not say

In order:
  1. the manifest: present, of this format version, made from *this* base
     model (its fingerprint), and signed with `key` when one is given (a
     manifest or deltas file modified after signing is a failed signature);
  2. every tensor of the edited checkpoint hashes to the manifest's `after`;
  3. the declared deltas, re-applied in order to the base tensors, give the
     edited tensors: each tensor is "unchanged" (bit for bit, nothing
     declared), "explained", "not_applied" (it equals the replay without one
     operation's delta, or the base) or "unexplained" (with the layer, and
     the Frobenius norm and numerical rank of what is left over);
  4. adapter slots that changed must be declared by an adapter entry of the
     same site and kind, and a declared "add" must have changed its slot.

Tolerance of step 3, in Frobenius norm: a tensor is explained when
`||edited - (base + Σ deltas)|| <= rtol · Σ||delta_i|| + atol`. `rtol`
(default 1e-3) covers an editor whose applied ΔW and recorded factors were
computed by different float32 expressions (MEMIT solves for ΔW, its
factors X, R come from a second solve); `atol` defaults to the rounding
every stored intermediate adds, `n_ops · 4ε · (||base|| + Σ||delta_i||)`,
ε the machine epsilon of the tensor's dtype. A tensor nothing declares must
equal the base bit for bit. The numerical rank counts singular values above
`max(rank_rtol · σ_max, the tolerance)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import adapters as adapters_lib
from keditjax.models import hf
from keditjax.stream import manifest as manifest_lib

PROBLEMS = ("signature", "manifest", "deltas_file", "delta", "config",
            "hash_mismatch", "missing", "unexpected", "shape", "unreadable",
            "unexplained", "not_applied")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One thing `verify` found.

  Attributes:
    tensor: the tensor (or adapter) name, None for the whole checkpoint.
    layer: its layer index, when it has one.
    kind: "explained", or a problem: one of `PROBLEMS`.
    norm: Frobenius norm of the change in question (unexplained part,
      missing delta, ...), when there is one.
    rank: its numerical rank, when it is a matrix.
    message: what, in words.
  """
  tensor: str | None
  layer: int | None
  kind: str
  norm: float | None = None
  rank: int | None = None
  message: str = ""

  @property
  def problem(self) -> bool:
    return self.kind in PROBLEMS

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Report:
  """What `verify` found about one edited checkpoint.

  Attributes:
    directory: the edited checkpoint.
    findings: `Finding`s, problems and explained tensors.
    tensors: tensor name -> "unchanged", "explained", "not_applied",
      "unexplained" (weights and adapters).
    operations: the manifest's operations as (kind, method) pairs.
    signature: "ok", "failed", or "not checked".
    tolerance: the tolerance settings used.
  """
  directory: str
  findings: tuple
  tensors: Mapping
  operations: tuple
  signature: str
  tolerance: Mapping

  @property
  def ok(self) -> bool:
    """No problem found."""
    return not self.problems

  @property
  def problems(self) -> list:
    return [f for f in self.findings if f.problem]

  def to_json(self) -> dict:
    return {"directory": self.directory, "ok": self.ok,
            "signature": self.signature,
            "operations": [list(op) for op in self.operations],
            "tolerance": dict(self.tolerance),
            "findings": [f.to_json() for f in self.findings],
            "tensors": dict(self.tensors)}

  def summary(self) -> str:
    """A few lines for people."""
    counts = {}
    for status in self.tensors.values():
      counts[status] = counts.get(status, 0) + 1
    methods = ", ".join(m if k == "apply" else f"rollback({m})"
                        for k, m in self.operations) or "none"
    problems = self.problems
    lines = [f"{self.directory}: " + ("OK" if self.ok else
                                     f"FAILED ({len(problems)} problem(s))"),
             f"  operations: {len(self.operations)} ({methods}); signature: "
             f"{self.signature}",
             "  tensors: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in (
                 "unchanged", "explained", "not_applied", "unexplained"))]
    for f in [f for f in self.findings if not f.problem] + problems:
      where = f.tensor or "checkpoint"
      if f.layer is not None:
        where += f" (layer {f.layer})"
      numbers = "".join([f", norm {f.norm:.4g}" if f.norm is not None else "",
                         f", rank {f.rank}" if f.rank is not None else ""])
      kind = f.kind.upper() if f.problem else f.kind
      lines.append(f"  {kind} {where}{numbers}: {f.message}")
    return "\n".join(lines)


def _norm(x) -> float:
  return float(np.linalg.norm(np.ravel(x)))


def numerical_rank(x, floor: float, rank_rtol: float) -> int | None:
  """How many singular values exceed `max(rank_rtol · σ_max, floor)`
  (None for a vector or scalar)."""
  x = np.asarray(x, np.float64)
  if x.ndim < 2:
    return None
  s = np.linalg.svd(x.reshape(x.shape[0], -1), compute_uv=False)
  if not s.size or s[0] == 0:
    return 0
  return int(np.sum(s > max(rank_rtol * s[0], floor)))


def _eps(dtype: str) -> float:
  try:
    return float(jnp.finfo(jnp.dtype(dtype)).eps)
  except (TypeError, ValueError):
    return float(np.finfo(np.float32).eps)


def _declared(manifest, arrays, shapes, findings) -> dict:
  """Tensor -> [(operation index, declared delta as float64)]."""
  out: dict[str, list] = {}
  for i, op in enumerate(manifest.operations):
    for d in op.deltas:
      where = (d.tensor, manifest_lib.layer_of(d.tensor))
      parts = [arrays.get(n) for n in d.arrays]
      if any(p is None for p in parts):
        findings.append(Finding(*where, "delta", message=(
            f"operation {i}: delta arrays {list(d.arrays)} are missing from "
            f"{manifest_lib.DELTAS}.")))
        continue
      if manifest_lib.delta_sha256(parts) != d.sha256:
        findings.append(Finding(*where, "delta", message=(
            f"operation {i}: the delta's arrays do not match its sha256 in "
            f"the manifest ({manifest_lib.DELTAS} was modified).")))
        continue
      parts = [np.asarray(p, np.float64) for p in parts]
      value = parts[0] @ parts[1] if d.form == "factored" else parts[0]
      if d.tensor not in shapes or value.shape != tuple(shapes[d.tensor]):
        findings.append(Finding(*where, "delta", message=(
            f"operation {i} declares a {value.shape} change of a tensor the "
            "base model does not have in that shape.")))
        continue
      out.setdefault(d.tensor, []).append((i, value))
  return out


def _check_weights(base_flat, edited_flat, declared, dtypes, rtol, atol,
                   rank_rtol, findings, statuses) -> None:
  for name in sorted(set(base_flat) | set(edited_flat)):
    layer = manifest_lib.layer_of(name)
    if name not in edited_flat:
      findings.append(Finding(name, layer, "missing", message=(
          "the base model has it, the edited checkpoint does not.")))
      continue
    if name not in base_flat:
      findings.append(Finding(name, layer, "unexpected",
                              _norm(edited_flat[name]), message=(
          "the edited checkpoint has it, the base model does not.")))
      continue
    b_raw, e_raw = np.asarray(base_flat[name]), np.asarray(edited_flat[name])
    if b_raw.shape != e_raw.shape:
      findings.append(Finding(name, layer, "shape", message=(
          f"shape {e_raw.shape}, the base's is {b_raw.shape}.")))
      continue
    by_op: dict[int, np.ndarray] = {}
    for i, value in declared.get(name, ()):
      by_op[i] = by_op[i] + value if i in by_op else value
    if not by_op and np.array_equal(b_raw, e_raw):
      statuses[name] = "unchanged"
      continue
    b, e = b_raw.astype(np.float64), e_raw.astype(np.float64)
    sizes = sum(_norm(v) for _, v in declared.get(name, ()))
    noise = max(len(by_op), 1) * 4 * _eps(dtypes.get(name, "float32")) * (
        _norm(b) + sizes)
    budget = rtol * sizes + (noise if atol is None else atol)
    if not by_op:
      residual = e - b
      statuses[name] = "unexplained"
      findings.append(Finding(  # any change counts: no floor for the rank
          name, layer, "unexplained", _norm(residual),
          numerical_rank(residual, 0.0, rank_rtol),
          "changed, and no operation declares a change to it."))
      continue
    total = sum(by_op.values())
    residual = e - (b + total)
    if _norm(residual) <= budget:
      statuses[name] = "explained"
      findings.append(Finding(
          name, layer, "explained", _norm(total), None,
          f"re-applying operations {sorted(by_op)} gives it (residual "
          f"{_norm(residual):.3g} <= tolerance {budget:.3g})."))
      continue
    missing = next((i for i, v in by_op.items()
                    if _norm(residual + v) <= budget), None)
    missing = [missing] if missing is not None else (
        sorted(by_op) if _norm(e - b) <= budget else None)
    if missing:
      gap = sum(by_op[i] for i in missing)
      statuses[name] = "not_applied"
      findings.append(Finding(
          name, layer, "not_applied", _norm(gap),
          numerical_rank(gap, budget, rank_rtol),
          f"equals the replay without operation(s) {missing}: declared but "
          "not applied."))
      continue
    statuses[name] = "unexplained"
    findings.append(Finding(
        name, layer, "unexplained", _norm(residual),
        numerical_rank(residual, budget, rank_rtol),
        f"differs from the replay of operations {sorted(by_op)} by more "
        f"than the tolerance {budget:.3g}."))


def _check_adapters(base_params, edited_params, manifest, findings,
                    statuses) -> None:
  declared: dict[tuple, dict] = {}  # (site, kind) -> {slot: last action}
  for op in manifest.operations:
    for e in op.adapters:
      declared.setdefault((e.site, e.kind), {})[e.index] = e.action
  _, base_table = adapters_lib.split(base_params)
  _, edited_table = adapters_lib.split(edited_params)
  seen = set()
  for site in sorted(edited_table):
    for order, adapter in enumerate(edited_table[site]):
      name = manifest_lib.adapter_name(site, order, adapter.kind)
      layer = manifest_lib.layer_of(site)
      old = next((a for a in base_table.get(site, ())
                  if a.kind == adapter.kind), None)
      marks = declared.get((site, adapter.kind), {})
      seen.add((site, adapter.kind))
      slots, norm = manifest_lib.slot_changes(old, adapter)
      if slots is None:  # no slot axis: the adapter as a whole
        status = ("unchanged" if norm == 0 else
                  "explained" if marks else "unexplained")
        if status == "unexplained":
          findings.append(Finding(name, layer, "unexplained", norm, None,
                                  f"a {adapter.kind} adapter changed that no "
                                  "adapter entry declares."))
        statuses[name] = status
        continue
      extra = sorted(set(slots) - set(marks))
      added = sorted(i for i, action in marks.items()
                     if action == "add" and i not in slots)
      if extra:
        findings.append(Finding(
            name, layer, "unexplained",
            float(np.sqrt(sum(slots[i] ** 2 for i in extra))), None,
            f"{adapter.kind} slots {extra} changed, and no adapter entry "
            "declares them."))
      if added:
        findings.append(Finding(name, layer, "not_applied", None, None,
                                f"{adapter.kind} slots {added} are declared "
                                "added but equal the base."))
      statuses[name] = ("unexplained" if extra else "not_applied" if added
                        else "explained" if slots else "unchanged")
      if slots and not extra and not added:
        findings.append(Finding(name, layer, "explained", norm, None,
                                f"{len(slots)} changed slot(s), all declared."))
  for (site, kind), marks in sorted(declared.items()):
    if (site, kind) not in seen and "add" in marks.values():
      findings.append(Finding(
          manifest_lib.adapter_name(site, 0, kind), manifest_lib.layer_of(site),
          "not_applied", None, None,
          f"{kind} entries are declared at {site}, which has no {kind} "
          "adapter."))
  for site, stack in sorted(base_table.items()):
    for order, adapter in enumerate(stack):
      if (site, adapter.kind) not in seen and (
          site, adapter.kind) not in declared:
        findings.append(Finding(
            manifest_lib.adapter_name(site, order, adapter.kind),
            manifest_lib.layer_of(site), "unexplained", None, None,
            "the base's adapter is gone, and no adapter entry declares it."))


def _check_base(manifest, base_params, source) -> None:
  base = manifest_lib.fingerprint(base_params)
  want = manifest.base.get("tensors", {})
  if manifest_lib.combined_digest(base) == manifest.base.get("sha256"):
    return
  differ = sorted(n for n in set(base) | set(want)
                  if base.get(n) != want.get(n))
  raise errors.VerifyError(
      f"{source} was made from another base model "
      f"({manifest.model.get('name')!r}, digest "
      f"{str(manifest.base.get('sha256'))[:12]}): {len(differ)} of "
      f"{len(want)} tensors differ from the base given, e.g. {differ[:3]}.")


def verify(base_params, edited_dir: str, *, key=None, rtol: float = 1e-3,
           atol: float | None = None, rank_rtol: float = 1e-3) -> Report:
  """Checks `edited_dir` (written by `save_edited`) against its base.

  Args:
    base_params: the base model's params (or the model itself).
    edited_dir: the edited checkpoint's directory.
    key: the signing key (bytes/str for HMAC, or an Ed25519 key); None skips
      the signature check.
    rtol, atol, rank_rtol: the tolerances (see the module docstring).

  Returns:
    A `Report`; `report.ok` is False when anything is unexplained.

  Raises:
    VerifyError: no manifest, another format version, a malformed manifest,
      or `base_params` is not the manifest's base model.
  """
  base_params = getattr(base_params, "params", base_params)
  if not isinstance(base_params, Mapping):
    raise errors.InputError(
        f"base_params must be a params pytree or a model, got "
        f"{type(base_params).__name__}.")
  if not (rtol >= 0 and rank_rtol >= 0 and (atol is None or atol >= 0)):
    raise errors.InputError(
        f"tolerances must be >= 0; got rtol={rtol}, atol={atol}, "
        f"rank_rtol={rank_rtol}.")
  if key is not None:
    manifest_lib.check_key(key)
  source = os.path.join(edited_dir, manifest_lib.MANIFEST)
  manifest_bytes, deltas_bytes = manifest_lib.read_files(edited_dir)
  findings, statuses = [], {}
  signature = "not checked"
  if key is not None:
    problem = manifest_lib.check_signature(
        manifest_bytes, deltas_bytes or b"", key, _read_signature(edited_dir))
    signature = "failed" if problem else "ok"
    if problem:
      findings.append(Finding(None, None, "signature", message=problem))
  data = manifest_lib.parse(manifest_bytes, source)
  manifest = manifest_lib.Manifest.from_json(data, source=source)
  _check_base(manifest, base_params, source)
  want = (data.get("deltas_file") or {}).get("sha256")
  if deltas_bytes is None or hashlib.sha256(deltas_bytes).hexdigest() != want:
    findings.append(Finding(None, None, "deltas_file", message=(
        f"{manifest_lib.DELTAS} is " + ("missing" if deltas_bytes is None
                                        else "not the file the manifest "
                                        "hashed (modified)") + ".")))
  try:
    arrays = manifest_lib.load_arrays(deltas_bytes)
  except errors.VerifyError as e:
    findings.append(Finding(None, None, "deltas_file", message=str(e)))
    arrays = {}
  tolerance = {"rtol": rtol, "atol": atol, "rank_rtol": rank_rtol}
  operations = tuple((op.kind, op.method if op.kind == "apply" else op.mode)
                     for op in manifest.operations)
  from keditjax import models
  try:
    edited = models.load("hf:" + edited_dir)
  except errors.CheckpointError as e:
    findings.append(Finding(None, None, "unreadable", message=str(e)))
    return Report(edited_dir, tuple(findings), statuses, operations,
                  signature, tolerance)
  _check_config(manifest, edited, findings)
  edited_flat = manifest_lib.tensors(edited.params)
  after = (manifest.after or {}).get("tensors")
  if after is None:
    findings.append(Finding(None, None, "manifest", message=(
        "the manifest has no 'after' fingerprint.")))
  else:
    for name in sorted(set(after) | set(edited_flat)):
      got = (manifest_lib.tensor_sha256(edited_flat[name])
             if name in edited_flat else None)
      if got != after.get(name):
        findings.append(Finding(name, manifest_lib.layer_of(name),
                                "hash_mismatch", message=(
            "not in the checkpoint" if got is None else
            "not in the manifest" if name not in after else
            "its sha256 differs from the manifest's (the file changed after "
            "it was written)") + "."))
  base_weights = hf.flatten(adapters_lib.split(base_params)[0])
  edited_weights = hf.flatten(adapters_lib.split(edited.params)[0])
  shapes = {n: np.shape(x) for n, x in base_weights.items()}
  declared = _declared(manifest, arrays, shapes, findings)
  _check_weights(base_weights, edited_weights, declared,
                 manifest.base.get("dtypes", {}), rtol, atol, rank_rtol,
                 findings, statuses)
  _check_adapters(base_params, edited.params, manifest, findings, statuses)
  return Report(edited_dir, tuple(findings), statuses, operations, signature,
                tolerance)


def _read_signature(directory: str) -> Any:
  try:
    with open(os.path.join(directory, manifest_lib.SIGNATURE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _check_config(manifest, edited, findings) -> None:
  want = manifest.model.get("config")
  if want is None:
    return
  from keditjax.models.config import to_hf_config
  got = manifest_lib.plain_json(to_hf_config(edited.config))
  differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if differ:
    findings.append(Finding(None, None, "config", message=(
        f"config.json differs from the manifest's model config in {differ}.")))
