"""`ModelConfig`: one frozen, hashable description of every architecture.

`from_hf_config` turns a Hugging Face `config.json` dict into a `ModelConfig`
and refuses, naming the field, anything that would change the math in a way
keditjax does not implement (penzai's habit: refuse loudly, never guess).
`to_hf_config` goes back, for export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keditjax import errors

ARCHS = ("llama", "gpt2", "gptj", "bert")
# HF model_type -> our arch. Mistral and Qwen2 are Llama-shaped decoders.
HF_MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "gpt2": "gpt2", "gptj": "gptj", "bert": "bert",
}
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters shared by all keditjax models.

  Attributes:
    arch: "llama" (Llama 2/3, SmolLM, Mistral, Qwen2), "gpt2", "gptj", "bert".
    vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
    intermediate_size, max_position_embeddings: the usual sizes.
    norm_eps: RMSNorm / LayerNorm epsilon.
    activation: MLP non-linearity.
    rope_theta: RoPE base; `rope_scaling` a sorted tuple of (key, value) pairs
      (hashable) or None; `rotary_dim` the rotated width (GPT-J partial rotary).
    tie_word_embeddings: the LM head reuses the token embedding.
    attention_bias: q/k/v projections have biases (Qwen2).
    attention_out_bias / mlp_bias: o-projection / MLP projections have biases.
    lm_head_bias: the LM head has a bias (GPT-J).
    sliding_window: attend to at most this many past positions (Mistral).
    type_vocab_size: BERT token-type vocabulary.
    hf_model_type: the Hugging Face model_type, for export.
    bos/eos/pad_token_id: special ids from the checkpoint config.
  """
  arch: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-5
  activation: str = "silu"
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  rotary_dim: int | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool = False
  mlp_bias: bool = False
  lm_head_bias: bool = False
  sliding_window: int | None = None
  type_vocab_size: int = 0
  hf_model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: Any = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise errors.UnsupportedArchitectureError(
          f"arch={self.arch!r} is not one of {ARCHS}.")
    if self.activation not in ACTIVATIONS:
      raise errors.UnsupportedConfigError(
          f"activation={self.activation!r} is not one of {ACTIVATIONS}.")
    if self.num_heads % self.num_kv_heads:
      raise errors.ConfigError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}.")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted(self.rope_scaling.items())))

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling or ())

  @property
  def is_decoder(self) -> bool:
    return self.arch != "bert"

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


# Fields every HF config carries that never change the forward math.
_HARMLESS = frozenset("""
_name_or_path architectures transformers_version torch_dtype dtype use_cache
initializer_range output_attentions output_hidden_states return_dict
id2label label2id problem_type chunk_size_feed_forward is_encoder_decoder
attention_dropout attn_pdrop embd_pdrop resid_pdrop hidden_dropout_prob
attention_probs_dropout_prob classifier_dropout summary_activation
summary_first_dropout summary_proj_to_labels summary_type summary_use_proj
pretraining_tp bos_token_id eos_token_id pad_token_id model_type
tokenizer_class task_specific_params gradient_checkpointing
max_window_layers n_ctx sep_token_id decoder_start_token_id
tie_encoder_decoder prefix cross_attention_hidden_size finetuning_task
tf_legacy_loss torchscript use_bfloat16 pruned_heads add_cross_attention
is_decoder position_embedding_type layer_types use_sliding_window
scale_attn_weights reorder_and_upcast_attn scale_attn_by_inverse_layer_idx
sliding_window rope_parameters rope_scaling rope_theta head_dim
attention_bias mlp_bias tie_word_embeddings
""".split())


def _refuse(field: str, value, why: str):
  raise errors.UnsupportedConfigError(
      f"Unsupported config field {field}={value!r}: {why}")


def _rope(hf: dict) -> tuple[float, tuple | None]:
  """RoPE theta and scaling from either the v4 or the v5 config layout."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling")
  if scaling:
    params.update(scaling)
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    _refuse("rope_scaling.rope_type", rope_type,
            f"keditjax implements {ROPE_TYPES}.")
  if rope_type == "default":
    return theta, None
  params["rope_type"] = rope_type
  params.pop("type", None)
  return theta, tuple(sorted(params.items()))


def _check_unknown(hf: dict, handled: set, strict: bool):
  if not strict:
    return
  for key in hf:
    if key not in handled and key not in _HARMLESS:
      _refuse(key, hf[key], "keditjax does not know whether it changes the "
              "model's math; pass strict=False to ignore unknown fields.")


def _check_act(field: str, value):
  if value not in ACTIVATIONS:
    _refuse(field, value, f"supported activations are {ACTIVATIONS}.")
  return value


def _common_ids(hf: dict) -> dict:
  return dict(bos_token_id=hf.get("bos_token_id"),
              eos_token_id=hf.get("eos_token_id"),
              pad_token_id=hf.get("pad_token_id"))


def _llama(hf: dict, strict: bool) -> ModelConfig:
  model_type = hf.get("model_type", "llama")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope(hf)
  handled = {"vocab_size", "hidden_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "max_position_embeddings", "rms_norm_eps", "hidden_act"}
  _check_unknown(hf, handled, strict)
  if hf.get("pretraining_tp", 1) not in (1, None):
    pass  # tensor-parallel slicing in HF is mathematically the same matmul.
  sliding = None
  if model_type == "mistral":
    sliding = hf.get("sliding_window")
  elif model_type == "qwen2" and hf.get("use_sliding_window"):
    _refuse("use_sliding_window", True,
            "Qwen2's per-layer sliding window is not implemented.")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types) and (
      model_type != "mistral"):
    _refuse("layer_types", sorted(set(layer_types)),
            "only 'full_attention' layers are implemented.")
  bias = bool(hf.get("attention_bias", model_type == "qwen2"))
  return ModelConfig(
      arch="llama", hf_model_type=model_type,
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      activation=_check_act("hidden_act", hf.get("hidden_act", "silu")),
      rope_theta=theta, rope_scaling=scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bias,
      attention_out_bias=bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      sliding_window=sliding, **_common_ids(hf))


def _gpt2(hf: dict, strict: bool) -> ModelConfig:
  handled = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
             "n_positions", "layer_norm_epsilon", "activation_function"}
  _check_unknown(hf, handled, strict)
  if hf.get("add_cross_attention"):
    _refuse("add_cross_attention", True, "cross-attention is not implemented.")
  if hf.get("scale_attn_by_inverse_layer_idx"):
    _refuse("scale_attn_by_inverse_layer_idx", True, "not implemented.")
  if hf.get("scale_attn_weights", True) is False:
    _refuse("scale_attn_weights", False, "unscaled attention not implemented.")
  if hf.get("tie_word_embeddings", True) is False:
    _refuse("tie_word_embeddings", False,
            "keditjax's GPT-2 head is the token embedding (tied).")
  d = hf["n_embd"]
  return ModelConfig(
      arch="gpt2", hf_model_type="gpt2", vocab_size=hf["vocab_size"],
      hidden_size=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
      intermediate_size=hf.get("n_inner") or 4 * d,
      max_position_embeddings=hf.get("n_positions", 1024),
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      activation=_check_act("activation_function",
                            hf.get("activation_function", "gelu_new")),
      tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
      mlp_bias=True, **_common_ids(hf))


def _gptj(hf: dict, strict: bool) -> ModelConfig:
  handled = {"vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
             "n_positions", "layer_norm_epsilon", "activation_function",
             "rotary_dim"}
  _check_unknown(hf, handled, strict)
  if hf.get("tie_word_embeddings"):
    _refuse("tie_word_embeddings", True, "GPT-J's head is untied with a bias.")
  d, heads = hf["n_embd"], hf["n_head"]
  return ModelConfig(
      arch="gptj", hf_model_type="gptj", vocab_size=hf["vocab_size"],
      hidden_size=d, num_layers=hf["n_layer"], num_heads=heads,
      num_kv_heads=heads, head_dim=d // heads,
      intermediate_size=hf.get("n_inner") or 4 * d,
      max_position_embeddings=hf.get("n_positions", 2048),
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      activation=_check_act("activation_function",
                            hf.get("activation_function", "gelu_new")),
      rotary_dim=hf.get("rotary_dim") or d // heads, rope_theta=10000.0,
      mlp_bias=True, lm_head_bias=True, **_common_ids(hf))


def _bert(hf: dict, strict: bool) -> ModelConfig:
  handled = {"vocab_size", "hidden_size", "num_hidden_layers",
             "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "layer_norm_eps", "hidden_act",
             "type_vocab_size", "gradient_checkpointing"}
  _check_unknown(hf, handled, strict)
  if hf.get("position_embedding_type", "absolute") != "absolute":
    _refuse("position_embedding_type", hf["position_embedding_type"],
            "only 'absolute' is implemented.")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    _refuse("is_decoder", True, "BERT is supported as an encoder only.")
  heads = hf["num_attention_heads"]
  return ModelConfig(
      arch="bert", hf_model_type="bert", vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=heads,
      head_dim=hf["hidden_size"] // heads,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      norm_eps=hf.get("layer_norm_eps", 1e-12),
      activation=_check_act("hidden_act", hf.get("hidden_act", "gelu")),
      type_vocab_size=hf.get("type_vocab_size", 2), attention_bias=True,
      attention_out_bias=True, mlp_bias=True, **_common_ids(hf))


_PARSERS = {"llama": _llama, "gpt2": _gpt2, "gptj": _gptj, "bert": _bert}


def from_hf_config(hf: dict, *, strict: bool = True) -> ModelConfig:
  """Builds a `ModelConfig` from a Hugging Face `config.json` dict.

  Args:
    hf: the parsed config.json.
    strict: refuse fields keditjax does not know (default). With False,
      unknown fields are ignored; fields known to change the math in an
      unimplemented way are always refused.

  Returns:
    The `ModelConfig`.

  Raises:
    UnsupportedArchitectureError: unknown `model_type`.
    UnsupportedConfigError: a field that changes the math is not implemented.
    ConfigError: a required field is missing.
  """
  model_type = hf.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise errors.UnsupportedArchitectureError(
        f"config.json model_type={model_type!r} is not supported; keditjax "
        f"loads {sorted(HF_MODEL_TYPES)}.")
  try:
    return _PARSERS[HF_MODEL_TYPES[model_type]](hf, strict)
  except KeyError as e:
    raise errors.ConfigError(
        f"config.json for model_type={model_type!r} lacks required field "
        f"{e.args[0]!r}.") from None


def to_hf_config(config: ModelConfig) -> dict:
  """The Hugging Face `config.json` dict describing `config` (for export)."""
  ids = {k: v for k, v in dict(
      bos_token_id=config.bos_token_id,
      eos_token_id=(list(config.eos_token_id) if isinstance(
          config.eos_token_id, tuple) else config.eos_token_id),
      pad_token_id=config.pad_token_id).items() if v is not None}
  c = config
  if c.arch == "llama":
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    rope.update(c.rope_scaling_dict)
    arch_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}[c.hf_model_type]
    out = dict(
        model_type=c.hf_model_type, architectures=[arch_name],
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps, hidden_act=c.activation,
        rope_theta=c.rope_theta, rope_parameters=rope,
        tie_word_embeddings=c.tie_word_embeddings)
    if c.rope_scaling:
      out["rope_scaling"] = dict(c.rope_scaling_dict)
    if c.hf_model_type == "llama":
      out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.hf_model_type == "mistral":
      out["sliding_window"] = c.sliding_window
    if c.hf_model_type == "qwen2":
      out["use_sliding_window"] = False
  elif c.arch == "gpt2":
    out = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
               vocab_size=c.vocab_size, n_embd=c.hidden_size,
               n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.intermediate_size,
               n_positions=c.max_position_embeddings,
               layer_norm_epsilon=c.norm_eps,
               activation_function=c.activation)
  elif c.arch == "gptj":
    out = dict(model_type="gptj", architectures=["GPTJForCausalLM"],
               vocab_size=c.vocab_size, n_embd=c.hidden_size,
               n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.intermediate_size, rotary_dim=c.rotary_dim,
               n_positions=c.max_position_embeddings,
               layer_norm_epsilon=c.norm_eps,
               activation_function=c.activation, tie_word_embeddings=False)
  else:
    out = dict(model_type="bert", architectures=["BertModel"],
               vocab_size=c.vocab_size, hidden_size=c.hidden_size,
               num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads,
               intermediate_size=c.intermediate_size,
               max_position_embeddings=c.max_position_embeddings,
               layer_norm_eps=c.norm_eps, hidden_act=c.activation,
               type_vocab_size=c.type_vocab_size)
  out.update(ids)
  return out
