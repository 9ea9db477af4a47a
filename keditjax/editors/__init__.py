"""Editors: one file per method, each a factory returning an `Editor`.

  editor = keditjax.editors.get("rome", layer=4)      # hparams overrides
  state = editor.init(model)
  new_params, state, info = editor.apply(model, model.params, requests, state)

`METHODS` is the one registry: method name -> `MethodSpec` (its module and
factory, imported lazily so that importing the package stays cheap, its
hparams class, family, the `init` inputs it needs and whether it edits a
batch at once); every factory takes a frozen hparams dataclass,
`hparams_class(name)` gives it. States save with `state_io`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import types
import typing

from keditjax import errors
from keditjax.editors.base import (AdapterEntry, EditInfo, Editor,
                                   EditRecord, FunctionalEditor, LeafDelta,
                                   Request, make_request, make_requests,
                                   select_inputs)

FAMILIES = ("regularization", "meta-learning", "direct", "architectural")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One registered editing method.

  Attributes:
    name: the registry key (and the editor's `name`).
    module: the module holding the factory (imported on first use).
    factory: the factory's name in `module`.
    hparams_class: the name of its hyper-parameter dataclass in `module`.
    family: one of `FAMILIES` (the survey's taxonomy).
    init_needs: the `init` inputs it needs or uses ("covariance",
      "templates", "trained_network", "fisher_data", "kl_inputs").
    batches: whether one `apply` writes a batch of requests at once (False:
      one request after another).
  """
  name: str
  module: str
  factory: str
  hparams_class: str
  family: str
  init_needs: tuple = ()
  batches: bool = True


_ED = "keditjax.editors."
METHODS = {spec.name: spec for spec in (
    MethodSpec("rome", _ED + "rome", "rome", "RomeHParams", "direct",
               ("covariance", "templates"), batches=False),
    MethodSpec("memit", _ED + "memit", "memit", "MemitHParams", "direct",
               ("covariance", "templates")),
    MethodSpec("alphaedit", _ED + "alphaedit", "alphaedit",
               "AlphaEditHParams", "direct", ("covariance", "templates")),
    MethodSpec("ultraedit", _ED + "ultraedit", "ultraedit",
               "UltraEditHParams", "direct"),
    MethodSpec("kn", _ED + "knowledge_neurons", "knowledge_neurons",
               "KnowledgeNeuronsHParams", "direct", (), batches=False),
    MethodSpec("ft", _ED + "finetune", "ft", "FTHParams", "regularization"),
    MethodSpec("ftl", _ED + "finetune", "ftl", "FTLHParams",
               "regularization"),
    MethodSpec("ftkl", _ED + "finetune", "ftkl", "FTKLHParams",
               "regularization", ("kl_inputs",)),
    MethodSpec("ewc", _ED + "finetune", "ewc", "EWCHParams",
               "regularization", ("fisher_data",)),
    MethodSpec("mend", _ED + "mend", "mend", "MendHParams", "meta-learning",
               ("trained_network",)),
    MethodSpec("mend_classifier", _ED + "mend_classifier", "mend_classifier",
               "MendClassifierHParams", "meta-learning",
               ("trained_network",)),
    MethodSpec("knowledge_editor", _ED + "knowledge_editor",
               "knowledge_editor", "KnowledgeEditorHParams", "meta-learning",
               ("trained_network",)),
    MethodSpec("enn", _ED + "enn", "enn", "ENNHParams", "meta-learning"),
    # The architectural family: adapters in the params pytree.
    MethodSpec("grace", _ED + "grace", "grace", "GraceHParams",
               "architectural", (), batches=False),
    MethodSpec("wise", _ED + "wise", "wise", "WiseHParams", "architectural", (), batches=False),
    MethodSpec("tpatcher", _ED + "tpatcher", "tpatcher", "TPatcherHParams", "architectural", (), batches=False),
    MethodSpec("serac", _ED + "serac", "serac", "SeracHParams",
               "architectural", ("scope_classifier",)),
)}


def _lookup(name: str):
  if name not in METHODS:
    raise errors.ConfigError(
        f"Unknown editing method {name!r}; available: {sorted(METHODS)}.")
  spec = METHODS[name]
  mod = importlib.import_module(spec.module)
  return getattr(mod, spec.factory), getattr(mod, spec.hparams_class)


def hparams_class(name: str):
  """The frozen hyper-parameter dataclass of method `name`."""
  return _lookup(name)[1]


def _conforms(value, hint, default) -> bool:
  """`value` has the type `hint` (elements like `default`'s when `hint` is a
  bare `tuple`), with every number finite and every int within int64."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return any(_conforms(value, h, default) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and -2 ** 63 <= value < 2 ** 63)
  if hint is float:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
  if hint is str:
    return isinstance(value, str) and _utf8(value)
  if hint is tuple or typing.get_origin(hint) is tuple:
    if not isinstance(value, tuple):
      return False
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_conforms(v, args[0], None) for v in value)
    if isinstance(default, tuple) and default:
      return all(_conforms(v, type(default[0]), default[0]) for v in value)
    return all(_conforms(v, typing.Any, None) for v in value)
  # Any other annotation: only the numbers inside are checked.
  if isinstance(value, (tuple, list)):
    return all(_conforms(v, typing.Any, None) for v in value)
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return math.isfinite(value)
  return True


def _utf8(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # a lone surrogate
    return False
  return True


def _normalized(value, hint):
  """An int given for a float-only field as a float (a Python int beyond
  int64 would overflow in a jitted call)."""
  options = set(typing.get_args(hint)) or {hint}
  if (float in options and int not in options and not isinstance(value, bool)
      and isinstance(value, numbers.Integral)):
    return float(value)
  return value


def _check_fields(name: str, cls, values) -> None:
  """Refuses the first of `values` (field -> value) that does not conform
  to its annotation in `cls`."""
  hints, defaults = typing.get_type_hints(cls), cls()
  for field, value in values.items():
    hint = hints[field]
    if not _conforms(value, hint, getattr(defaults, field)):
      shown = getattr(hint, "__name__", None) or str(hint)
      raise errors.ConfigError(
          f"{name}: {field}={value!r:.80} is not a valid {shown} (numbers "
          "must be finite, ints within int64, and bools are not numbers).")


def check_hparams(name: str, hparams) -> None:
  """Refuses a field whose value does not have its annotated type.

  The generic check behind every method's own `__post_init__`: a NaN or
  infinite number, a bool or a fraction where an int goes, a string for a
  number, an int beyond int64, a tuple whose elements are not like the
  default's.

  Raises:
    ConfigError: naming the first bad field, its value and its type.
  """
  _check_fields(name, type(hparams), {
      f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)})


def get(name: str, hparams=None, **overrides) -> Editor:
  """The editor for method `name`, with default or given hyper-parameters.

  Every field is checked against its annotation (`check_hparams`) before
  the method's own checks run (a tuple field takes a tuple, not a list:
  hparams must stay hashable); an int given for a float field becomes a
  float.

  Args:
    name: a key of `METHODS`.
    hparams: a hyper-parameter dataclass instance (default: the class defaults).
    **overrides: fields to replace in `hparams`.

  Raises:
    ConfigError: unknown method, an override that is not a field, or a value
      of the wrong type (NaN and infinite numbers included).
  """
  factory, cls = _lookup(name)
  if hparams is None:
    hparams = cls()
  elif not isinstance(hparams, cls):
    raise errors.ConfigError(
        f"{name} takes {cls.__name__} hyper-parameters, got "
        f"{type(hparams).__name__}.")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise errors.UnsupportedConfigError(
        f"{name} has no hyper-parameter(s) {unknown}; fields: {sorted(fields)}.")
  check_hparams(name, hparams)
  hints = typing.get_type_hints(cls)
  overrides = {k: _normalized(v, hints[k]) for k, v in overrides.items()}
  # Typed before `replace` runs the method's own checks (which compare
  # numbers, and would raise a bare TypeError on a string).
  _check_fields(name, cls, overrides)
  return factory(dataclasses.replace(hparams, **overrides))


__all__ = ["AdapterEntry", "EditInfo", "EditRecord", "Editor", "FAMILIES",
           "FunctionalEditor", "LeafDelta", "METHODS", "MethodSpec", "Request",
           "check_hparams", "get", "hparams_class", "make_request",
           "make_requests", "select_inputs"]
