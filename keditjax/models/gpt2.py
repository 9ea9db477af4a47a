"""GPT-2 in Flax: learned positions, pre-LayerNorm blocks, fused QKV, tied head.

Parameter names follow the Hugging Face layout (`h_3/mlp/c_proj/kernel`).
HF's GPT-2 `Conv1D` already stores its weight `[in, out]`, the orientation
of our kernels, so the import table transposes nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from keditjax.models import layers
from keditjax.models.config import ModelConfig
from keditjax.models.sites import Sites

# Site -> the parameter leaf it writes (`{l}` is the layer).
SITE_PARAMS = {
    "embed": ("wte", "embedding"),
    "attn/out": ("h_{l}", "attn", "c_proj", "kernel"),
    "mlp/key": ("h_{l}", "mlp", "c_fc", "kernel"),
    "mlp/value": ("h_{l}", "mlp", "c_proj", "kernel"),
}


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, layer_cache, index):
    c = self.config
    b, l, d = x_BxLxD.shape
    qkv_BxLx3D = layers.dense(3 * d, "c_attn", True)(x_BxLxD)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
        t.reshape(b, l, c.num_heads, c.head_dim)
        for t in jnp.split(qkv_BxLx3D, 3, axis=-1))
    o, new_cache = layers.cached_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask, layer_cache, index)
    return layers.dense(d, "c_proj", True)(o.reshape(b, l, d)), new_cache


class Block(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, mask, sites, out, layer_cache, index):
    c = self.config
    h, new_cache = Attention(c, name="attn")(
        layers.layer_norm(c, "ln_1")(x_BxLxD), mask, layer_cache, index)
    x_BxLxD = x_BxLxD + sites.visit(f"layer/{self.layer}/attn/out", h, out)
    mlp = layers.GeluMLP(c, self.layer, "c_fc", "c_proj", name="mlp")
    x_BxLxD = x_BxLxD + mlp(layers.layer_norm(c, "ln_2")(x_BxLxD), sites, out)
    return sites.visit(f"layer/{self.layer}/resid", x_BxLxD, out), new_cache


class GPT2LM(nn.Module):
  """GPT-2 causal LM: `(tokens, ...) -> (logits_BxLxV, out, cache)`.

  The learned position embedding is indexed by the positions of
  `layers.positions_and_mask`, so left padding and the KV cache see the same
  positions as an unpadded prompt.

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
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(c.vocab_size, c.hidden_size, name="wte", embedding_init=init)
    wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, name="wpe",
                   embedding_init=init)
    out = {}
    if hidden is None:
      x_BxLxD = sites.visit("embed", wte(tokens_BxL) + wpe(positions_BxL), out)
    else:
      x_BxLxD = hidden
    index = None if cache is None else cache["index"]
    new_layers = {}
    for i in range(start, stop):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BxLxD, new_layer_cache = Block(c, i, name=f"h_{i}")(
          x_BxLxD, mask, sites, out, layer_cache, index)
      new_layers[i] = new_layer_cache
    new_cache = layers.finish_cache(cache, new_layers, cache_pos,
                                    shape_src.shape[1])
    if stop_layer is not None:  # the residual stream, even after the last block
      return x_BxLxD, out, new_cache
    x_BxLxD = layers.gather_positions(x_BxLxD, logit_positions)
    logits = wte.attend(layers.layer_norm(c, "ln_f")(x_BxLxD))
    return logits, out, new_cache


BLOCK_NAME = "h_{l}"


def apply_block(config: ModelConfig, params, x_BxLxD, positions_BxL, mask,
                layer_cache, index):
  """One block on its own parameter subtree, without sites (`lm.run_scanned`).

  Returns:
    (residual stream after the block, the block's updated cache).
  """
  del positions_BxL  # positions enter with the embeddings
  return Block(config, 0).apply({"params": params}, x_BxLxD, mask, Sites(), {}, layer_cache, index)


# Hugging Face tensor name -> our parameter path (no transforms: Conv1D is
# already [in, out]). GPT2LMHeadModel saves `transformer.h.0...`, GPT2Model
# (and the original hub checkpoints) `h.0...`: every row exists with both
# prefixes; export uses the first, `transformer.`, which both classes load.
_ROWS = (
    ("wte.weight", "wte/embedding"),
    ("wpe.weight", "wpe/embedding"),
    ("h.{l}.ln_1.weight", "h_{l}/ln_1/scale"),
    ("h.{l}.ln_1.bias", "h_{l}/ln_1/bias"),
    ("h.{l}.attn.c_attn.weight", "h_{l}/attn/c_attn/kernel"),
    ("h.{l}.attn.c_attn.bias", "h_{l}/attn/c_attn/bias"),
    ("h.{l}.attn.c_proj.weight", "h_{l}/attn/c_proj/kernel"),
    ("h.{l}.attn.c_proj.bias", "h_{l}/attn/c_proj/bias"),
    ("h.{l}.ln_2.weight", "h_{l}/ln_2/scale"),
    ("h.{l}.ln_2.bias", "h_{l}/ln_2/bias"),
    ("h.{l}.mlp.c_fc.weight", "h_{l}/mlp/c_fc/kernel"),
    ("h.{l}.mlp.c_fc.bias", "h_{l}/mlp/c_fc/bias"),
    ("h.{l}.mlp.c_proj.weight", "h_{l}/mlp/c_proj/kernel"),
    ("h.{l}.mlp.c_proj.bias", "h_{l}/mlp/c_proj/bias"),
    ("ln_f.weight", "ln_f/scale"),
    ("ln_f.bias", "ln_f/bias"),
)
HF_TABLE = tuple((prefix + hf_name, path, None)
                 for prefix in ("transformer.", "") for hf_name, path in _ROWS)
# The causal-mask buffers older checkpoints carry, and the tied head.
HF_IGNORE = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$",
             r"lm_head\.weight$")
