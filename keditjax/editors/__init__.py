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


def get(name: str, hparams=None, **overrides) -> Editor:
  """The editor for method `name`, with default or given hyper-parameters.

  Args:
    name: a key of `METHODS`.
    hparams: a hyper-parameter dataclass instance (default: the class defaults).
    **overrides: fields to replace in `hparams`.

  Raises:
    ConfigError: unknown method, or an override that is not a field.
  """
  factory, cls = _lookup(name)
  hparams = cls() if hparams is None else hparams
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise errors.UnsupportedConfigError(
        f"{name} has no hyper-parameter(s) {unknown}; fields: {sorted(fields)}.")
  return factory(dataclasses.replace(hparams, **overrides))


__all__ = ["AdapterEntry", "EditInfo", "EditRecord", "Editor", "FAMILIES",
           "FunctionalEditor", "LeafDelta", "METHODS", "MethodSpec", "Request",
           "get", "hparams_class", "make_request", "make_requests",
           "select_inputs"]
