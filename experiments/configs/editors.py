"""Hyper-parameters of every editor, one sub-config per method.

  python -m experiments.edit --method=rome --config.rome.layer=5
  python -m experiments.edit --method=memit --config.memit.layers="(3,4,5)"

The defaults are the editors' dataclass defaults (tuned for SmolLM2-135M).
"""

import dataclasses

import ml_collections

from keditjax import editors


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  for name in editors.METHODS:
    hparams = editors.hparams_class(name)()
    fields = {f.name: getattr(hparams, f.name)
              for f in dataclasses.fields(hparams)}
    # `None` fields get a placeholder type so command-line overrides parse.
    sub = ml_collections.ConfigDict()
    for key, value in fields.items():
      if value is None:
        sub[key] = ml_collections.FieldReference(None, field_type=object)
      else:
        sub[key] = value
    config[name] = sub
  return config


def hparams_from(config: ml_collections.ConfigDict, method: str):
  """The method's frozen hparams dataclass from its sub-config."""
  cls = editors.hparams_class(method)
  values = dict(config[method])
  for field in dataclasses.fields(cls):
    if isinstance(values.get(field.name), list):
      values[field.name] = tuple(
          tuple(v) if isinstance(v, list) else v for v in values[field.name])
  return cls(**values)
