"""The keditjax exception family.

Every error keditjax raises on bad input derives from `KeditError`, is raised
before any work starts, and names the offending field and what would be valid.
Subclasses also derive from the matching builtin (`ValueError`, `KeyError`, ...)
so generic handlers keep working.
"""


class KeditError(Exception):
  """Base class of every keditjax error."""


class ConfigError(KeditError, ValueError):
  """A configuration value is invalid."""


class UnsupportedConfigError(ConfigError):
  """A config field changes the model's math in a way keditjax does not implement."""


class CheckpointError(KeditError):
  """A checkpoint file is missing a tensor, has an unmapped one, or is corrupt."""


class ModelNotFoundError(KeditError, FileNotFoundError):
  """A model name, directory or file could not be found."""


class UnsupportedArchitectureError(KeditError, ValueError):
  """The checkpoint's architecture is not one keditjax implements."""


class TokenizerError(KeditError):
  """A tokenizer could not be built or used."""


class SiteError(KeditError, KeyError):
  """An edit-site name is malformed or does not exist in the model."""

  def __str__(self):  # KeyError quotes its message; keep it readable.
    return str(self.args[0]) if self.args else ""


class InputError(KeditError, ValueError):
  """A user input (prompt, tokens, request) is invalid."""


class ShardingError(KeditError):
  """A mesh or sharding rule cannot be built or applied."""


class VerifyError(KeditError):
  """An edited checkpoint cannot be verified: no manifest, an unknown format
  version, or a base model other than the one its manifest names."""
