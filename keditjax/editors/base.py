"""The editor interface every editing family shares (STYLE.md §2).

An editor is built by a factory that closes over a frozen, hashable
hyper-parameter dataclass, and is a pair of pure functions:

  state = editor.init(model, params, **inputs)        # statistics, templates
  new_params, state, info = editor.apply(model, params, requests, state)

`apply` never mutates `params` (undo is "keep the old pytree"), and the
returned params are valid input to any other editor. The state is a pytree
of arrays plus hashable static metadata (never the model or a jitted
closure: those are cached outside it, keyed by hashable things), so it can
be jitted, sharded and saved (`keditjax.editors.state_io`). `info` is an
`EditInfo`: which leaves changed and by how much, where the time went, and
one `EditRecord` per request saying exactly what was written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax
import numpy as np

from keditjax import errors
from keditjax.models import lm


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


def _target(text, field: str = "target_new"):
  """A target as it follows a prompt: with exactly one leading space."""
  if text is None:
    return None
  if isinstance(text, Mapping):  # ROME's {"str": ..., "id": ...}
    text = text.get("str")
  if not isinstance(text, str):
    raise errors.InputError(
        f"{field} must be a string, got {type(text).__name__} {text!r:.80}.")
  return text if text.startswith(" ") else " " + text


def _check_text(case_id, field: str, text) -> None:
  """`text` can be encoded (tokenizers take UTF-8: a lone surrogate such as
  '\\ud800' cannot be)."""
  if not isinstance(text, str):
    return
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise errors.InputError(
        f"request {case_id!r}: {field} is not valid UTF-8 text (a lone "
        f"surrogate {text[e.start]!r} at index {e.start}).") from None


def _rewrite_fields(item: Mapping) -> dict:
  """Our fields from ROME's `{"requested_rewrite": {...}}` layout."""
  rewrite = item["requested_rewrite"]
  if isinstance(rewrite, list) and rewrite:
    rewrite = rewrite[0]
  if not isinstance(rewrite, Mapping):
    raise errors.InputError(
        f"request {item.get('case_id')!r}: requested_rewrite must be a dict "
        f"(or a list holding one), got {rewrite!r:.80}.")
  return dict(prompt=rewrite.get("prompt"), subject=rewrite.get("subject"),
              target_new=rewrite.get("target_new"),
              target_true=rewrite.get("target_true"),
              case_id=item.get("case_id"))


def make_request(item) -> Request:
  """Builds and validates a `Request` from a dict or a `Request`.

  Accepts our fields, the flattened CounterFact/EasyEdit layout (`prompt`
  with the subject written out, `target_new`, `ground_truth`), and ROME's
  original `{"requested_rewrite": {...}}` layout. The prompt template holds
  exactly one `{}` and no other brace (`str.format` and the editors'
  template splitting would read one differently).

  Raises:
    InputError: a field of the wrong type, empty or not valid UTF-8, a
      subject not in the prompt, or a template with other braces.
  """
  if isinstance(item, Request):
    fields = dataclasses.asdict(item)
  elif isinstance(item, Mapping):
    if "requested_rewrite" in item:
      fields = _rewrite_fields(item)
    else:
      fields = dict(prompt=item.get("prompt"), subject=item.get("subject"),
                    target_new=item.get("target_new"),
                    target_true=item.get("target_true",
                                         item.get("ground_truth")),
                    case_id=item.get("case_id"))
  else:
    raise errors.InputError(
        f"an edit request must be a dict or a Request, got {type(item).__name__}.")
  case_id = fields.get("case_id")
  for field in ("prompt", "subject", "target_new", "target_true"):
    _check_text(case_id, field, fields[field])
  prompt, subject = fields["prompt"], fields["subject"]
  if not isinstance(subject, str) or not subject.strip():
    raise errors.InputError(
        f"request {case_id!r}: empty subject (it must be a non-empty string, "
        f"got {subject!r:.80}).")
  if not isinstance(prompt, str) or not prompt.strip():
    raise errors.InputError(
        f"request {case_id!r}: empty prompt (it must be a non-empty string, "
        f"got {prompt!r:.80}).")
  if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
    raise errors.InputError(
        f"request {case_id!r}: the prompt {prompt!r:.200} has a brace other "
        "than the one '{}' standing for the subject.")
  if "{}" not in prompt:
    if subject not in prompt:
      raise errors.InputError(
          f"request {case_id!r}: subject {subject!r:.200} does not occur in "
          f"the prompt {prompt!r:.200}.")
    prompt = prompt.replace(subject, "{}", 1)
  if prompt.count("{}") != 1:
    raise errors.InputError(
        f"request {case_id!r}: the prompt template {prompt!r:.200} must "
        "contain exactly one '{}'.")
  target_new = _target(fields["target_new"])
  if target_new is None or not target_new.strip():
    raise errors.InputError(f"request {case_id!r}: empty target_new.")
  return Request(prompt, subject, target_new,
                 _target(fields["target_true"], "target_true"), case_id)


def make_requests(items) -> tuple[Request, ...]:
  """Validates a batch (a single dict/Request is a batch of one).

  Identical requests may repeat; two that ask the same prompt and subject
  for different targets conflict (no edit can satisfy both) and are refused.

  Raises:
    InputError: not a request or a list of them, an invalid request, an
      empty batch, or conflicting requests.
  """
  if isinstance(items, (Request, Mapping)):
    items = [items]
  if isinstance(items, (str, bytes, bytearray)) or not isinstance(
      items, Iterable):
    raise errors.InputError(
        "requests must be a Request, a dict or a list of those, got "
        f"{type(items).__name__}.")
  requests = tuple(make_request(item) for item in items)
  if not requests:
    raise errors.InputError("no edit requests given.")
  wanted = {}
  for request in requests:
    key = (request.prompt, request.subject)
    if wanted.setdefault(key, request.target_new) != request.target_new:
      raise errors.InputError(
          f"conflicting requests for {request.text!r:.200}: targets "
          f"{wanted[key]!r:.80} and {request.target_new!r:.80} in one batch.")
  return requests


# -- edit records ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeafDelta:
  """A weight edit: `W' = W + u @ v` on the leaf at `path`.

  Attributes:
    path: the parameter path tuple.
    factors: `(u_FxR, v_RxD)` numpy float32 arrays, or None when the method
      has no low-rank form (fine-tuning, hypernetworks, ...).
  """
  path: tuple[str, ...]
  factors: tuple | None = None

  def to_json(self) -> dict:
    out = {"type": "leaf_delta", "path": "/".join(self.path)}
    if self.factors is not None:
      digest = hashlib.sha256()
      for f in self.factors:
        digest.update(np.ascontiguousarray(f, np.float32).tobytes())
      out["factor_shapes"] = [list(np.shape(f)) for f in self.factors]
      out["sha256"] = digest.hexdigest()
    return out


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
  """An adapter edit: entry `index` of the adapter of `kind` at `site`.

  Attributes:
    site: the named site ("layer/4/mlp/value").
    kind: the adapter kind ("grace", ...).
    index: the entry (codebook row, patch neuron, ...).
    action: "add", "update" or "remove".
    previous: the entry's previous contents for an update, else None.
  """
  site: str
  kind: str
  index: int
  action: str = "add"
  previous: dict | None = None

  def to_json(self) -> dict:
    return {"type": "adapter_entry", "site": self.site, "kind": self.kind,
            "index": int(self.index), "action": self.action,
            "previous": None if self.previous is None else sorted(
                self.previous)}


@dataclasses.dataclass(frozen=True)
class EditRecord:
  """What one request wrote.

  Attributes:
    id: unique over runs (a uuid4 hex).
    method: the editor's name.
    request: the request (a `Request`, or a classifier edit as given).
    touched: `LeafDelta`s and/or `AdapterEntry`s.
  """
  id: str
  method: str
  request: Any
  touched: tuple

  def to_json(self) -> dict:
    return {"id": self.id, "method": self.method,
            "request": _plain_request(self.request),
            "touched": [t.to_json() for t in self.touched]}


def _plain_request(request):
  """A small JSON view of a request (arrays become their shapes)."""
  if dataclasses.is_dataclass(request) and not isinstance(request, type):
    request = {f.name: getattr(request, f.name)
               for f in dataclasses.fields(request)}
  if isinstance(request, Mapping):
    return {str(k): _plain_request(v) for k, v in request.items()}
  if isinstance(request, (np.ndarray, jax.Array)) and np.ndim(request):
    return {"shape": list(np.shape(request))}
  if isinstance(request, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(request).item()
  if isinstance(request, (str, int, float, bool)) or request is None:
    return request
  return repr(request)


def request_items(requests) -> list:
  """`requests` as a list (one request, a dict or a `Request`, is a list of
  one)."""
  if isinstance(requests, (Request, Mapping)) or not isinstance(
      requests, Iterable) or isinstance(requests, str):
    return [requests]
  return list(requests)


def make_records(method: str, requests: Sequence, touched) -> list:
  """One `EditRecord` per request.

  Args:
    method: the editor's name.
    requests: the requests of the call, in order.
    touched: one tuple per request, or one tuple shared by all of them.
  """
  if isinstance(touched, tuple):
    touched = [touched] * len(requests)
  return [EditRecord(uuid.uuid4().hex, method, request, tuple(t))
          for request, t in zip(requests, touched)]


def leaf_records(method: str, requests: Sequence, paths) -> list:
  """Records touching `paths` without factors (one per request)."""
  return make_records(method, requests,
                      tuple(LeafDelta(tuple(p)) for p in paths))


@dataclasses.dataclass
class EditInfo:
  """What an `apply` call did.

  Attributes:
    changed: parameter path ("layers_4/mlp/down_proj/kernel") -> dict with the
      Frobenius norm of the change (`delta_norm`) and of the old leaf
      (`weight_norm`); `rank` too when asked for (an SVD: not by default).
    seconds: phase name -> wall seconds (phases are editor specific).
    extras: anything else the editor reports (losses, steps, ...).
    records: one `EditRecord` per request.
  """
  changed: dict = dataclasses.field(default_factory=dict)
  seconds: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)
  records: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    """A JSON-able dict; records are small (paths, factor shapes, hashes)."""
    def plain(x):
      if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
      if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
      if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
      return x
    return {"changed": plain(self.changed), "seconds": plain(self.seconds),
            "extras": plain(self.extras),
            "records": [r.to_json() for r in self.records]}


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


class Editor(Protocol):
  """What every editor offers (DESIGN.md, "Contracts").

  Attributes:
    name: the method name (a key of `keditjax.editors.METHODS`).
    hparams: its frozen, hashable hyper-parameter dataclass.
  """
  name: str
  hparams: Any

  def init(self, model, params=None, **inputs) -> Any:
    """The editor state for `model` (statistics, templates, networks).

    Args:
      model: the model to edit (a `LanguageModel`, a classifier, ...).
      params: the weights to compute statistics with (default the model's).
      **inputs: method-specific inputs (`covariance`, `templates`,
        `trained`, `fisher_data`, `kl_inputs`, ...); an unknown one raises
        `ConfigError` before any work.

    Returns:
      A registered pytree dataclass of arrays and static metadata.
    """

  def apply(self, model, params, requests, state) -> tuple[Any, Any,
                                                           "EditInfo"]:
    """Edits `params` (untouched) with `requests`.

    Args:
      model: the model `state` was built for.
      params: the weights to edit.
      requests: one request or a list of them.
      state: from `init` or an earlier `apply`.

    Returns:
      `(new_params, new_state, EditInfo)`.
    """


def _keywords(fn: Callable, skip: int) -> tuple[frozenset | None, tuple]:
  """The keyword names `fn` accepts after its first `skip` parameters (None:
  any, it has `**kwargs`), and all its parameter names."""
  params = list(inspect.signature(fn).parameters.values())
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None, tuple(p.name for p in params)
  names = [p.name for p in params[skip:]
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  return frozenset(names), tuple(p.name for p in params)


def _check_keywords(editor_name: str, what: str, fn: Callable, skip: int,
                    given) -> None:
  accepted, _ = _keywords(fn, skip)
  if accepted is None:
    return
  unknown = sorted(set(given) - accepted)
  if unknown:
    raise errors.ConfigError(
        f"{editor_name}.{what}() got unknown keyword(s) {unknown}; it "
        f"accepts {sorted(accepted) or 'none'}.")


@dataclasses.dataclass(frozen=True)
class FunctionalEditor:
  """An `Editor` made of two plain functions (what every factory returns).

  Attributes:
    name: the method name.
    hparams: the hyper-parameters the functions close over.
    init_fn: `init_fn(model, params=None, **inputs) -> state`.
    apply_fn: `apply_fn(model, params, requests, state) -> (params, state,
      EditInfo)`.
  """
  name: str
  hparams: Any
  init_fn: Callable
  apply_fn: Callable

  @property
  def init_keywords(self) -> frozenset:
    """The keywords `init` accepts besides `model` (None: any)."""
    return _keywords(self.init_fn, 2)[0]

  def init(self, model, params=None, **inputs):
    """See `Editor.init`; unknown keywords raise `ConfigError` first."""
    _check_keywords(self.name, "init", self.init_fn, 2, inputs)
    return self.init_fn(model, params, **inputs)

  def apply(self, model, params, requests, state, **options):
    """See `Editor.apply`; unknown keywords raise `ConfigError` first."""
    _check_keywords(self.name, "apply", self.apply_fn, 4, options)
    return self.apply_fn(model, params, requests, state, **options)


def select_inputs(editor, inputs: Mapping) -> dict:
  """The entries of `inputs` that `editor.init` accepts.

  A harness that offers every method the same menu of inputs (a Fisher
  dataset, KL inputs, ...) passes each only what its `init` declares.
  """
  accepted = getattr(editor, "init_keywords", None)
  if accepted is None:
    return dict(inputs)
  return {k: v for k, v in inputs.items() if k in accepted}


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


def keep_sharding(new, old):
  """`new` placed like `old` when `old` is an array spread over devices.

  An edit of a sharded model (`keditjax.sharding.shard_model`) must leave
  each leaf where the sharding rules put it: a new kernel built from host
  arrays or an unconstrained computation would otherwise land on one device
  (and a 7B model's edited leaves would gather there). Single-device and
  traced leaves, and a `new` of another shape, are returned unchanged.
  """
  if (not isinstance(old, jax.Array) or isinstance(old, jax.core.Tracer)
      or isinstance(new, jax.core.Tracer)
      or len(old.sharding.device_set) < 2 or np.shape(new) != old.shape):
    return new
  if isinstance(new, jax.Array) and new.sharding.is_equivalent_to(
      old.sharding, old.ndim):
    return new
  return jax.device_put(new, old.sharding)


def replace_leaves(params, updates: Mapping[tuple, Any], *,
                   allow_new: bool = False):
  """A new pytree with `updates` (path tuple -> array) replacing leaves.

  Only the dicts on the way to a replaced leaf are copied; every other leaf
  is shared with `params`, which is left untouched. A replaced leaf keeps
  the sharding of the leaf it replaces when that one spans several devices
  (`keep_sharding`), so editing a sharded model keeps it sharded.

  Args:
    params: a nested dict pytree.
    updates: path tuple -> new leaf.
    allow_new: create paths that do not exist (and the dicts on the way);
      by default a missing leaf is an error.

  Raises:
    SiteError: a path that does not exist (without `allow_new`), or one that
      runs through a leaf.
  """
  updates = {tuple(p): v for p, v in updates.items()}

  def rebuild(node, prefix):
    out = dict(node)
    below = [p for p in updates if p[:len(prefix)] == prefix and
             len(p) > len(prefix)]
    for key in dict.fromkeys(p[len(prefix)] for p in below):
      path = prefix + (key,)
      if path in updates:
        out[key] = keep_sharding(updates[path], node.get(key))
      else:
        child = node.get(key, {}) if isinstance(node, Mapping) else {}
        if not isinstance(child, Mapping):
          raise errors.SiteError(
              f"cannot create {'/'.join(p for p in below[0])}: "
              f"{'/'.join(path)} is a leaf.")
        out[key] = rebuild(child, path)
    return out
  if not allow_new:
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


def encode_request(model, request, method: str) -> tuple[list, list]:
  """The request's prompt and target ids, checked before any work: a
  tokenizer, neither empty, and together within the model's context."""
  tok = model.tokenizer
  if tok is None:
    raise errors.TokenizerError(f"{method} needs a tokenizer; {model!r} has none.")
  prompt = tok.encode(request.text)
  target = tok.encode(request.target_new)
  if not prompt or not target:
    raise errors.InputError(
        f"request {request.case_id!r}: empty prompt or target after "
        "tokenization.")
  limit = model.config.max_position_embeddings
  if len(prompt) + len(target) > limit:
    raise errors.InputError(
        f"request {request.case_id!r}: prompt + target is "
        f"{len(prompt) + len(target)} tokens; the model takes {limit}.")
  return prompt, target


def edit_layout(model, prompt, target) -> dict:
  """One request right-padded to a length bucket, as NumPy arrays: `tokens`
  and `mask` (1, length) of prompt + target, and per target token (width a
  bucket of 4) the predicting position `where`, the id `targets` and
  `tmask` (1 for real tokens). `prompt` and `target` are checked id lists."""
  ids = list(prompt) + list(target)
  length = lm.bucket(len(ids))
  if length > model.config.max_position_embeddings:  # callers checked ids
    length = len(ids)
  width = lm.bucket(len(target), 4)
  out = dict(tokens=np.zeros((1, length), np.int32),
             mask=np.zeros((1, length), np.int32),
             where=np.zeros((1, width), np.int32),
             targets=np.zeros((1, width), np.int32),
             tmask=np.zeros((1, width), np.float32))
  out["tokens"][0, :len(ids)] = ids
  out["mask"][0, :len(ids)] = 1
  out["where"][0, :len(target)] = np.arange(len(prompt) - 1, len(ids) - 1)
  out["targets"][0, :len(target)] = target
  out["tmask"][0, :len(target)] = 1
  return out


def check_decoder_layer(model, layer: int, method: str) -> None:
  """`layer` exists and the model is a decoder LM (adapter editors)."""
  check_layers([layer], model.config.num_layers, "layer")
  if not model.config.is_decoder:
    raise errors.ConfigError(f"{method} edits decoder language models.")


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

