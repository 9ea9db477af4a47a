"""Torch-free import of llama.cpp GGUF checkpoints.

`read_gguf` turns a GGUF file into what a Hugging Face checkpoint directory
would hold: a `config.json`-style dict, float32 numpy weights under the HF
Llama names and orientation, and a `tokenizers` JSON string.

llama.cpp's converter changes three things that are undone here:
  * names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
  * shapes, which GGUF lists fastest-axis first (the reader's `data` is
    already numpy-ordered, i.e. HF `[out, in]`);
  * for llama-family models, the rows of Q and K, which it permutes per head
    so that its rotary embedding can rotate adjacent pairs.

`gguf` and `tokenizers` are imported lazily, so importing this module does not
make them hard dependencies of keditjax.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from keditjax import errors

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Architectures whose Q/K rows llama.cpp permutes (qwen2's converter does not).
_ROPE_PERMUTED = ("llama", "mistral")
_HF_CLASSES = {"llama": ("llama", "LlamaForCausalLM"),
               "mistral": ("llama", "LlamaForCausalLM"),
               "qwen2": ("qwen2", "Qwen2ForCausalLM")}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# tokenizer.ggml.pre -> how text is split before byte-level BPE.
_GPT2 = "gpt2"  # ByteLevel's built-in GPT-2 regex
_DIGITS_GPT2 = "digits+gpt2"  # each digit alone, then the GPT-2 regex
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": _GPT2, "gpt2": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2,
    "llama3": _LLAMA3_REGEX, "llama-bpe": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_MAX_METADATA_ARRAY = 64


@dataclasses.dataclass(frozen=True)
class GGUFContents:
  """Everything `read_gguf` gets out of a GGUF file.

  Attributes:
    hf_config: a Hugging Face `config.json`-style dict.
    tensors: HF parameter name -> float32 array in HF shape/orientation.
    tokenizer_json: a serialized `tokenizers.Tokenizer`.
    metadata: the file's scalar (and short array) key/values, for provenance.
  """
  hf_config: dict
  tensors: dict
  tokenizer_json: str
  metadata: dict


def read_gguf(path: str | os.PathLike) -> GGUFContents:
  """Reads a GGUF checkpoint into HF-style config, float32 weights and tokenizer.

  Args:
    path: the `.gguf` file.

  Returns:
    A `GGUFContents`.

  Raises:
    ModelNotFoundError: the file does not exist.
    CheckpointError: the file is corrupt, or holds a tensor that cannot be mapped.
    UnsupportedArchitectureError: `general.architecture` is not supported.
    UnsupportedConfigError: the metadata asks for math keditjax does not do.
    TokenizerError: the tokenizer metadata cannot be turned into a tokenizer.
  """
  reader = _open(path)
  arch = _architecture(reader)
  hf_config = _hf_config(reader, arch)
  tensors = _tensors(reader, arch, hf_config, path)
  hf_config["tie_word_embeddings"] = "lm_head.weight" not in tensors
  tokenizer = _tokenizer(reader)
  return GGUFContents(hf_config=hf_config, tensors=tensors,
                      tokenizer_json=tokenizer.to_str(),
                      metadata=_metadata(reader))


def stream_gguf(path: str | os.PathLike):
  """Like `read_gguf`, but `tensors` is an iterator of `(name, array)` pairs.

  The file's tensors are dequantized lazily, one at a time, as the iterator
  is consumed (`models.load_gguf` places each on the device and drops it:
  the peak memory is the params plus one tensor). `hf_config`'s
  `tie_word_embeddings` is known before the tensors are read.
  """
  reader = _open(path)
  arch = _architecture(reader)
  hf_config = _hf_config(reader, arch)
  hf_config["tie_word_embeddings"] = not any(
      _hf_name(t.name, path) == "lm_head.weight" for t in reader.tensors)
  tokenizer = _tokenizer(reader)
  return GGUFContents(hf_config=hf_config,
                      tensors=_iter_tensors(reader, arch, hf_config, path),
                      tokenizer_json=tokenizer.to_str(),
                      metadata=_metadata(reader))


def gguf_tokenizer(source: str | os.PathLike | GGUFContents):
  """The `tokenizers.Tokenizer` described by a GGUF file.

  Args:
    source: a `.gguf` path (only the metadata is read, no weights are
      dequantized) or a `GGUFContents` from `read_gguf`.

  Returns:
    A byte-level BPE `tokenizers.Tokenizer`; encoding adds no special tokens.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  if isinstance(source, GGUFContents):
    return tokenizers.Tokenizer.from_str(source.tokenizer_json)
  return _tokenizer(_open(source))


def unpermute_rope_rows(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's per-head permutation of Q/K projection rows.

  llama.cpp's converter reshapes each head's rows as (2, head_dim/2) and
  transposes them to (head_dim/2, 2), interleaving the two rotary halves.

  Args:
    w_out_in: a Q or K weight `[n_heads * head_dim, in]` (or a bias
      `[n_heads * head_dim]`) as stored in the GGUF.
    n_heads: query heads for Q, key/value heads for K.

  Returns:
    The array in Hugging Face row order, same shape.
  """
  half = w_out_in.shape[0] // n_heads // 2
  rest = w_out_in.shape[1:]
  return (w_out_in.reshape(n_heads, half, 2, *rest).swapaxes(1, 2)
          .reshape(w_out_in.shape))


def _open(path):
  import gguf  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.ModelNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as err:  # The reader raises many types on malformed input.
    raise errors.CheckpointError(
        f"Could not parse GGUF file {path} (truncated or corrupt?): "
        f"{type(err).__name__}: {err}") from err


_MISSING = object()


def _field(reader, key: str, default: Any = _MISSING) -> Any:
  import gguf  # pylint: disable=g-import-not-at-top
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise errors.CheckpointError(f"GGUF metadata key {key!r} is missing.")
    return default
  value = field.contents()
  if field.types == [gguf.GGUFValueType.FLOAT32]:  # 1e-05, not 9.99999974e-06
    value = float(str(np.float32(value)))
  return value


def _architecture(reader) -> str:
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise errors.UnsupportedArchitectureError(
        f"GGUF architecture {arch!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  return arch


def _metadata(reader) -> dict:
  out = {}
  for key, field in reader.fields.items():
    if len(field.data) > _MAX_METADATA_ARRAY:
      continue  # the vocabulary, merges, token types...
    out[key] = _field(reader, key)
  return out


def _hf_config(reader, arch: str) -> dict:
  def key(name, default=_MISSING):
    return _field(reader, f"{arch}.{name}", default)

  hidden, n_heads = key("embedding_length"), key("attention.head_count")
  head_dim = key("attention.key_length", hidden // n_heads)
  rotary = key("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise errors.UnsupportedConfigError(
        f"{arch}.rope.dimension_count={rotary} differs from head_dim="
        f"{head_dim} (partial rotary embeddings are not supported).")
  model_type, hf_class = _HF_CLASSES[arch]
  n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if (
      "tokenizer.ggml.tokens" in reader.fields) else None
  config = {
      "model_type": model_type,
      "architectures": [hf_class],
      "vocab_size": key("vocab_size", n_vocab),
      "hidden_size": hidden,
      "intermediate_size": key("feed_forward_length"),
      "num_hidden_layers": key("block_count"),
      "num_attention_heads": n_heads,
      "num_key_value_heads": key("attention.head_count_kv", n_heads),
      "head_dim": head_dim,
      "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
      "rope_theta": key("rope.freq_base", 10000.0),
      "max_position_embeddings": key("context_length"),
      "hidden_act": "silu",
      "attention_bias": arch == "qwen2",
      "mlp_bias": False,
  }
  for name in ("bos", "eos", "padding"):
    token_id = _field(reader, f"tokenizer.ggml.{name}_token_id", None)
    if token_id is not None:
      config[f"{'pad' if name == 'padding' else name}_token_id"] = token_id
  scaling = key("rope.scaling.type", "none")
  if scaling != "none":
    config["rope_scaling"] = {"rope_type": scaling,
                              "factor": key("rope.scaling.factor")}
    original = key("rope.scaling.original_context_length", None)
    if original is not None:
      config["rope_scaling"]["original_max_position_embeddings"] = original
  elif key("rope.scale_linear", 1.0) != 1.0:  # older files
    config["rope_scaling"] = {"rope_type": "linear",
                              "factor": key("rope.scale_linear")}
  return config


def _hf_name(gguf_name: str, path) -> str:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _BLOCK_RE.fullmatch(gguf_name)
  if match and match.group(2) in _LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
  raise errors.CheckpointError(
      f"GGUF tensor {gguf_name!r} in {path} has no Hugging Face equivalent.")


def _expected_shapes(config: dict) -> dict:
  d, f, v = (config["hidden_size"], config["intermediate_size"],
             config["vocab_size"])
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  layer = {"input_layernorm.weight": (d,),
           "post_attention_layernorm.weight": (d,),
           "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
           "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
           "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f)}
  if config["attention_bias"]:
    layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.bias": (kv,)})
  for i in range(config["num_hidden_layers"]):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
  return shapes


def _tensors(reader, arch: str, config: dict, path) -> dict:
  return dict(_iter_tensors(reader, arch, config, path))


def _iter_tensors(reader, arch: str, config: dict, path):
  """`(HF name, float32 array)` pairs, dequantized one tensor at a time.

  A loader that places each array as it comes and drops it holds one float32
  tensor beside the placed params, not the whole float32 checkpoint.
  """
  from gguf import quants  # pylint: disable=g-import-not-at-top
  expected = _expected_shapes(config)
  expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
  seen = set()
  for tensor in reader.tensors:
    name = _hf_name(tensor.name, path)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF: ne0 first
    try:
      values = quants.dequantize(tensor.data, tensor.tensor_type)
      values = np.array(values, dtype=np.float32).reshape(shape)  # own copy
    except Exception as err:  # pylint: disable=broad-except
      raise errors.CheckpointError(
          f"Could not dequantize {tensor.name!r} ({tensor.tensor_type.name}) "
          f"from {path}: {err}") from err
    if shape != expected[name]:
      raise errors.CheckpointError(
          f"{tensor.name!r} in {path} has shape {shape}; the metadata implies "
          f"{expected[name]} for {name}.")
    if arch in _ROPE_PERMUTED and ".self_attn.q_proj." in name:
      values = unpermute_rope_rows(values, config["num_attention_heads"])
    elif arch in _ROPE_PERMUTED and ".self_attn.k_proj." in name:
      values = unpermute_rope_rows(values, config["num_key_value_heads"])
    seen.add(name)
    yield name, values
  missing = sorted(set(expected) - seen - {"lm_head.weight"})
  if missing:
    raise errors.CheckpointError(
        f"GGUF file {path} lacks {len(missing)} tensors, e.g. {missing[:3]}.")


def _tokenizer(reader):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind = _field(reader, "tokenizer.ggml.model", None)
  if kind != "gpt2":
    raise errors.TokenizerError(
        f"GGUF tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' "
        "(byte-level BPE) is.")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise errors.TokenizerError(
        f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
        f"{', '.join(sorted(_PRE_TOKENIZERS))}.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  token_types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
  if any(len(m) != 2 for m in merges):
    raise errors.TokenizerError("A GGUF merge is not two space-separated tokens.")
  vocab = {}
  for token_id, token in enumerate(tokens):
    vocab.setdefault(token, token_id)  # first spelling wins on duplicates
  split = _PRE_TOKENIZERS[pre]
  model = tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                ignore_merges=split == _LLAMA3_REGEX)
  tokenizer = tokenizers.Tokenizer(model)
  if split == _GPT2:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  elif split == _DIGITS_GPT2:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  added = lambda kind, special: [  # pylint: disable=g-long-lambda
      tokenizers.AddedToken(t, special=special, normalized=False)
      for t, ty in zip(tokens, token_types) if ty == kind]
  tokenizer.add_special_tokens(added(_CONTROL, True))
  tokenizer.add_tokens(added(_USER_DEFINED, False))
  return tokenizer
