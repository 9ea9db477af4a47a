"""The editor interface every editing family shares (STYLE.md §2).

An editor is built by a factory that closes over a frozen, hashable
hyper-parameter dataclass, and is a pair of pure functions:

  state = editor.init(model, params)                  # statistics, templates
  new_params, state, info = editor.apply(params, requests, state)

`apply` never mutates `params` (undo is "keep the old pytree"), and the
returned params are valid input to any other editor. `info` is an `EditInfo`:
which leaves changed and by how much, and where the time went.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from keditjax import errors


@dataclasses.dataclass(frozen=True)
class Request:
  """One edit: `prompt.format(subject)` should continue with `target_new`.

  Attributes:
    prompt: a template with one `{}` standing for the subject.
    subject: the subject string (ROME/MEMIT locate the fact at its last token).
    target_new: the new continuation (a leading space is added if missing).
    target_true: the original continuation, when known (for metrics).
    case_id: an identifier carried into results.
  """
  prompt: str
  subject: str
  target_new: str
  target_true: str | None = None
  case_id: Any = None

  @property
  def text(self) -> str:
    """The prompt with the subject filled in."""
    return self.prompt.format(self.subject)


def _target(text):
  """A target as it follows a prompt: with exactly one leading space."""
  if text is None:
    return None
  if isinstance(text, Mapping):  # ROME's {"str": ..., "id": ...}
    text = text.get("str")
  if not isinstance(text, str):
    raise errors.InputError(f"a target must be a string, got {text!r}.")
  return text if text.startswith(" ") else " " + text


def make_request(item) -> Request:
  """Builds and validates a `Request` from a dict or a `Request`.

  Accepts our fields, the flattened CounterFact/EasyEdit layout (`prompt`
  with the subject written out, `target_new`, `ground_truth`), and ROME's
  original `{"requested_rewrite": {...}}` layout.

  Raises:
    InputError: empty subject or target, or a subject not in the prompt.
  """
  if isinstance(item, Request):
    fields = dataclasses.asdict(item)
  elif isinstance(item, Mapping):
    if "requested_rewrite" in item:
      rewrite = item["requested_rewrite"]
      rewrite = rewrite[0] if isinstance(rewrite, list) else rewrite
      fields = dict(prompt=rewrite.get("prompt"),
                    subject=rewrite.get("subject"),
                    target_new=rewrite.get("target_new"),
                    target_true=rewrite.get("target_true"),
                    case_id=item.get("case_id"))
    else:
      fields = dict(prompt=item.get("prompt"), subject=item.get("subject"),
                    target_new=item.get("target_new"),
                    target_true=item.get("target_true",
                                         item.get("ground_truth")),
                    case_id=item.get("case_id"))
  else:
    raise errors.InputError(
        f"an edit request must be a dict or a Request, got {type(item).__name__}.")
  prompt, subject = fields["prompt"], fields["subject"]
  if not isinstance(subject, str) or not subject.strip():
    raise errors.InputError(f"request {fields.get('case_id')!r}: empty subject.")
  if not isinstance(prompt, str) or not prompt.strip():
    raise errors.InputError(f"request {fields.get('case_id')!r}: empty prompt.")
  if "{}" not in prompt:
    if subject not in prompt:
      raise errors.InputError(
          f"request {fields.get('case_id')!r}: subject {subject!r} does not "
          f"occur in the prompt {prompt!r}.")
    prompt = prompt.replace(subject, "{}", 1)
  if prompt.count("{}") != 1:
    raise errors.InputError(
        f"request {fields.get('case_id')!r}: the prompt template {prompt!r} "
        "must contain exactly one '{}'.")
  target_new = _target(fields["target_new"])
  if target_new is None or not target_new.strip():
    raise errors.InputError(
        f"request {fields.get('case_id')!r}: empty target_new.")
  return Request(prompt, subject, target_new, _target(fields["target_true"]),
                 fields["case_id"])


def make_requests(items) -> tuple[Request, ...]:
  """Validates a batch (a single dict/Request is a batch of one)."""
  if isinstance(items, (Request, Mapping)):
    items = [items]
  requests = tuple(make_request(item) for item in items)
  if not requests:
    raise errors.InputError("no edit requests given.")
  return requests


@dataclasses.dataclass
class EditInfo:
  """What an `apply` call did.

  Attributes:
    changed: parameter path ("layers_4/mlp/down_proj/kernel") -> dict with the
      Frobenius norm of the change (`delta_norm`) and of the old leaf
      (`weight_norm`); `rank` too when asked for (an SVD: not by default).
    seconds: phase name -> wall seconds (phases are editor specific).
    extras: anything else the editor reports (losses, steps, ...).
  """
  changed: dict = dataclasses.field(default_factory=dict)
  seconds: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    def plain(x):
      if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
      if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
      if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
      return x
    return plain(dataclasses.asdict(self))


class Timer:
  """Accumulates wall time per phase: `with timer("key"): ...`."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def __call__(self, phase: str):
    timer = self

    class _Phase:
      def __enter__(self):
        self.start = time.perf_counter()

      def __exit__(self, *exc):
        timer.seconds[phase] = (timer.seconds.get(phase, 0.0) +
                                time.perf_counter() - self.start)
    return _Phase()


@dataclasses.dataclass(frozen=True)
class Editor:
  """An editor: `init(model, params=None, **kw) -> state` and
  `apply(params, requests, state) -> (new_params, state, EditInfo)`."""
  name: str
  hparams: Any
  init: Callable
  apply: Callable


# -- parameter pytrees ------------------------------------------------------

def get_leaf(params, path: Sequence[str]):
  """`params[path[0]][path[1]]...`, with a clear error for a missing leaf."""
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise errors.SiteError(
          f"parameter {'/'.join(path)} does not exist (no {key!r} under "
          f"{'/'.join(path[:i]) or 'the root'}).")
    node = node[key]
  return node


def replace_leaves(params, updates: Mapping[tuple, Any]):
  """A new pytree with `updates` (path tuple -> array) replacing leaves.

  Only the dicts on the way to a replaced leaf are copied; every other leaf
  is shared with `params`, which is left untouched.
  """
  def rebuild(node, prefix):
    out = dict(node)
    for key in node:
      path = prefix + (key,)
      if path in updates:
        out[key] = updates[path]
      elif any(p[:len(path)] == path for p in updates):
        out[key] = rebuild(node[key], path)
    return out
  for path in updates:
    get_leaf(params, path)
  return rebuild(params, ())


def describe_changes(old_params, updates: Mapping[tuple, Any],
                     with_rank: bool = False) -> dict:
  """`EditInfo.changed` entries for leaves replaced by `updates`."""
  changed = {}
  for path, new in updates.items():
    old = get_leaf(old_params, path)
    delta = np.asarray(new, np.float64) - np.asarray(old, np.float64)
    entry = {"delta_norm": float(np.linalg.norm(delta)),
             "weight_norm": float(np.linalg.norm(np.asarray(old, np.float64)))}
    if with_rank:
      entry["rank"] = int(np.linalg.matrix_rank(delta.astype(np.float32)))
    changed["/".join(path)] = entry
  return changed


def check_layers(layers: Iterable[int], num_layers: int, field: str) -> tuple:
  """Validates edit layers against the model depth (before any work)."""
  layers = tuple(int(l) for l in layers)
  if not layers:
    raise errors.ConfigError(f"{field} is empty.")
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad:
    raise errors.ConfigError(
        f"{field}={layers}: layers {bad} are out of range; the model has "
        f"layers 0..{num_layers - 1}.")
  return layers

