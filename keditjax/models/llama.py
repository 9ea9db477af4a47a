"""The Llama family in Flax: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2.

Pre-norm decoder with RMSNorm, RoPE (configurable theta, llama3/linear
scaling), grouped-query attention, SwiGLU MLP, optional q/k/v biases (Qwen2),
sliding-window attention (Mistral), tied or untied embeddings. Parameter
names follow the Hugging Face layout (`layers_3/mlp/down_proj/kernel`), with
kernels stored `[in, out]` so that `value = key @ kernel`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from keditjax.models import layers
from keditjax.models.config import ModelConfig
from keditjax.models.sites import Sites

# Site -> the parameter leaf it writes (`{l}` is the layer).
SITE_PARAMS = {
    "embed": ("embed_tokens", "embedding"),
    "attn/out": ("layers_{l}", "self_attn", "o_proj", "kernel"),
    "mlp/key": ("layers_{l}", "mlp", "up_proj", "kernel"),
    "mlp/value": ("layers_{l}", "mlp", "down_proj", "kernel"),
}


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, layer_cache, index):
    c = self.config
    b, l, _ = x_BxLxD.shape
    q = layers.dense(c.num_heads * c.head_dim, "q_proj", c.attention_bias)(x_BxLxD)
    k = layers.dense(c.num_kv_heads * c.head_dim, "k_proj", c.attention_bias)(x_BxLxD)
    v = layers.dense(c.num_kv_heads * c.head_dim, "v_proj", c.attention_bias)(x_BxLxD)
    inv_freq = layers.rope_inv_freq(c)
    q_BxLxHxK = layers.apply_rope(q.reshape(b, l, c.num_heads, c.head_dim),
                                  positions_BxL, inv_freq)
    k_BxLxGxK = layers.apply_rope(k.reshape(b, l, c.num_kv_heads, c.head_dim),
                                  positions_BxL, inv_freq)
    v_BxLxGxK = v.reshape(b, l, c.num_kv_heads, c.head_dim)
    o, new_cache = layers.cached_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, layer_cache, index)
    o_BxLxD = layers.dense(c.hidden_size, "o_proj", c.attention_out_bias)(
        o.reshape(b, l, c.num_heads * c.head_dim))
    return o_BxLxD, new_cache


class MLP(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, sites: Sites, out: dict):
    c = self.config
    x_BxLxD = sites.visit(f"layer/{self.layer}/mlp/in", x_BxLxD, out)
    gate = layers.dense(c.intermediate_size, "gate_proj", c.mlp_bias)(x_BxLxD)
    up = layers.dense(c.intermediate_size, "up_proj", c.mlp_bias)(x_BxLxD)
    key_BxLxF = layers.activation(c.activation)(gate) * up
    key_BxLxF = sites.visit(f"layer/{self.layer}/mlp/key", key_BxLxF, out)
    value_BxLxD = layers.dense(c.hidden_size, "down_proj", c.mlp_bias)(key_BxLxF)
    return sites.visit(f"layer/{self.layer}/mlp/value", value_BxLxD, out)


class Block(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, sites, out, layer_cache,
               index):
    c = self.config
    h = nn.RMSNorm(c.norm_eps, name="input_layernorm")(x_BxLxD)
    h, new_cache = Attention(c, name="self_attn")(h, positions_BxL, mask,
                                                  layer_cache, index)
    x_BxLxD = x_BxLxD + sites.visit(f"layer/{self.layer}/attn/out", h, out)
    h = nn.RMSNorm(c.norm_eps, name="post_attention_layernorm")(x_BxLxD)
    x_BxLxD = x_BxLxD + MLP(c, self.layer, name="mlp")(h, sites, out)
    return sites.visit(f"layer/{self.layer}/resid", x_BxLxD, out), new_cache


class LlamaLM(nn.Module):
  """Llama-family causal LM: `(tokens, ...) -> (logits_BxLxV, out, cache)`.

  Partial passes let editors skip work an edit cannot change: `hidden` (with
  `start_layer`) replaces the embeddings by the residual stream entering block
  `start_layer`; `stop_layer` stops before that block and returns the residual
  stream instead of logits; `logit_positions` `[B, T]` computes the head only
  at those positions.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, positions=None, attention_mask=None,
               sites: Sites = Sites(), cache=None, hidden=None,
               start_layer: int = 0, stop_layer=None, logit_positions=None):
    c = self.config
    start, stop = layers.layer_span(c, start_layer, stop_layer)
    shape_src = tokens_BxL if hidden is None else hidden
    positions_BxL, mask, cache_pos = layers.positions_and_mask(
        c, shape_src, positions, attention_mask, cache)
    out = {}
    embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens",
                     embedding_init=nn.initializers.normal(0.02))
    if hidden is None:
      x_BxLxD = sites.visit("embed", embed(tokens_BxL), out)
    else:
      x_BxLxD = hidden
    index = None if cache is None else cache["index"]
    new_layers = {}
    for i in range(start, stop):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BxLxD, new_layer_cache = Block(c, i, name=f"layers_{i}")(
          x_BxLxD, positions_BxL, mask, sites, out, layer_cache, index)
      new_layers[i] = new_layer_cache
    new_cache = layers.finish_cache(cache, new_layers, cache_pos,
                                    shape_src.shape[1])
    if stop_layer is not None:  # the residual stream, even after the last block
      return x_BxLxD, out, new_cache
    x_BxLxD = layers.gather_positions(x_BxLxD, logit_positions)
    x_BxLxD = nn.RMSNorm(c.norm_eps, name="norm")(x_BxLxD)
    if c.tie_word_embeddings:
      logits = embed.attend(x_BxLxD)
    else:
      logits = layers.dense(c.vocab_size, "lm_head", False)(x_BxLxD)
    return logits, out, new_cache


BLOCK_NAME = "layers_{l}"


def apply_block(config: ModelConfig, params, x_BxLxD, positions_BxL, mask,
                layer_cache, index):
  """One block on its own parameter subtree, without sites (`lm.run_scanned`).

  Returns:
    (residual stream after the block, the block's updated cache).
  """
  return Block(config, 0).apply({"params": params}, x_BxLxD, positions_BxL, mask, Sites(), {}, layer_cache, index)


# Hugging Face tensor name -> our parameter path, and the transform between
# them ("T": transpose a torch Linear [out, in] into our [in, out] kernel).
HF_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", None),
    ("model.layers.{l}.input_layernorm.weight", "layers_{l}/input_layernorm/scale", None),
    ("model.layers.{l}.post_attention_layernorm.weight", "layers_{l}/post_attention_layernorm/scale", None),
    ("model.layers.{l}.self_attn.q_proj.weight", "layers_{l}/self_attn/q_proj/kernel", "T"),
    ("model.layers.{l}.self_attn.k_proj.weight", "layers_{l}/self_attn/k_proj/kernel", "T"),
    ("model.layers.{l}.self_attn.v_proj.weight", "layers_{l}/self_attn/v_proj/kernel", "T"),
    ("model.layers.{l}.self_attn.o_proj.weight", "layers_{l}/self_attn/o_proj/kernel", "T"),
    ("model.layers.{l}.self_attn.q_proj.bias", "layers_{l}/self_attn/q_proj/bias", None),
    ("model.layers.{l}.self_attn.k_proj.bias", "layers_{l}/self_attn/k_proj/bias", None),
    ("model.layers.{l}.self_attn.v_proj.bias", "layers_{l}/self_attn/v_proj/bias", None),
    ("model.layers.{l}.self_attn.o_proj.bias", "layers_{l}/self_attn/o_proj/bias", None),
    ("model.layers.{l}.mlp.gate_proj.weight", "layers_{l}/mlp/gate_proj/kernel", "T"),
    ("model.layers.{l}.mlp.up_proj.weight", "layers_{l}/mlp/up_proj/kernel", "T"),
    ("model.layers.{l}.mlp.down_proj.weight", "layers_{l}/mlp/down_proj/kernel", "T"),
    ("model.layers.{l}.mlp.gate_proj.bias", "layers_{l}/mlp/gate_proj/bias", None),
    ("model.layers.{l}.mlp.up_proj.bias", "layers_{l}/mlp/up_proj/bias", None),
    ("model.layers.{l}.mlp.down_proj.bias", "layers_{l}/mlp/down_proj/bias", None),
    ("model.norm.weight", "norm/scale", None),
    ("lm_head.weight", "lm_head/kernel", "T"),
)
# Buffers some checkpoints carry that are not parameters.
HF_IGNORE = (r".*\.rotary_emb\.inv_freq",)
