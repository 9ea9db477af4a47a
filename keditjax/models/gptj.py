"""GPT-J in Flax: parallel attention + MLP blocks, partial interleaved RoPE.

Each block computes `x + attn(ln_1(x)) + mlp(ln_1(x))` (Wang & Komatsuzaki,
2021). Rotary embeddings rotate adjacent feature pairs (GPT-J's
`rotate_every_two`) on the first `rotary_dim` features of each head; the rest
pass through. q/k/v/out projections have no bias; the untied LM head has one.
"""

from __future__ import annotations

import flax.linen as nn

from keditjax.models import layers
from keditjax.models.config import ModelConfig
from keditjax.models.sites import Sites

# Site -> the parameter leaf it writes (`{l}` is the layer).
SITE_PARAMS = {
    "embed": ("wte", "embedding"),
    "attn/out": ("h_{l}", "attn", "out_proj", "kernel"),
    "mlp/key": ("h_{l}", "mlp", "fc_in", "kernel"),
    "mlp/value": ("h_{l}", "mlp", "fc_out", "kernel"),
}


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, layer_cache, index):
    c = self.config
    b, l, d = x_BxLxD.shape
    shape = (b, l, c.num_heads, c.head_dim)
    inv_freq = layers.rope_inv_freq(c)  # over rotary_dim, base rope_theta.
    q_BxLxHxK, k_BxLxHxK = (
        layers.apply_rope(
            layers.dense(d, name, False)(x_BxLxD).reshape(shape),
            positions_BxL, inv_freq, interleaved=True)
        for name in ("q_proj", "k_proj"))
    v_BxLxHxK = layers.dense(d, "v_proj", False)(x_BxLxD).reshape(shape)
    o, new_cache = layers.cached_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask, layer_cache, index)
    return layers.dense(d, "out_proj", False)(o.reshape(b, l, d)), new_cache


class Block(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask, sites, out, layer_cache,
               index):
    c = self.config
    h_BxLxD = layers.layer_norm(c, "ln_1")(x_BxLxD)
    attn_BxLxD, new_cache = Attention(c, name="attn")(
        h_BxLxD, positions_BxL, mask, layer_cache, index)
    attn_BxLxD = sites.visit(f"layer/{self.layer}/attn/out", attn_BxLxD, out)
    mlp = layers.GeluMLP(c, self.layer, "fc_in", "fc_out", name="mlp")
    mlp_BxLxD = mlp(h_BxLxD, sites, out)
    x_BxLxD = x_BxLxD + attn_BxLxD + mlp_BxLxD
    return sites.visit(f"layer/{self.layer}/resid", x_BxLxD, out), new_cache


class GPTJLM(nn.Module):
  """GPT-J causal LM: `(tokens, ...) -> (logits_BxLxV, out, cache)`.

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
    wte = nn.Embed(c.vocab_size, c.hidden_size, name="wte",
                   embedding_init=nn.initializers.normal(0.02))
    out = {}
    if hidden is None:
      x_BxLxD = sites.visit("embed", wte(tokens_BxL), out)
    else:
      x_BxLxD = hidden
    index = None if cache is None else cache["index"]
    new_layers = {}
    for i in range(start, stop):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BxLxD, new_layer_cache = Block(c, i, name=f"h_{i}")(
          x_BxLxD, positions_BxL, mask, sites, out, layer_cache, index)
      new_layers[i] = new_layer_cache
    new_cache = layers.finish_cache(cache, new_layers, cache_pos,
                                    shape_src.shape[1])
    if stop_layer is not None:  # the residual stream, even after the last block
      return x_BxLxD, out, new_cache
    x_BxLxD = layers.gather_positions(x_BxLxD, logit_positions)
    x_BxLxD = layers.layer_norm(c, "ln_f")(x_BxLxD)
    logits = layers.dense(c.vocab_size, "lm_head", c.lm_head_bias)(x_BxLxD)
    return logits, out, new_cache


BLOCK_NAME = "h_{l}"


def apply_block(config: ModelConfig, params, x_BxLxD, positions_BxL, mask,
                layer_cache, index):
  """One block on its own parameter subtree, without sites (`lm.run_scanned`).

  Returns:
    (residual stream after the block, the block's updated cache).
  """
  return Block(config, 0).apply({"params": params}, x_BxLxD, positions_BxL, mask, Sites(), {}, layer_cache, index)


# Hugging Face tensor name -> our parameter path, and the transform ("T":
# torch Linear [out, in] -> our [in, out] kernel).
HF_TABLE = (
    ("transformer.wte.weight", "wte/embedding", None),
    ("transformer.h.{l}.ln_1.weight", "h_{l}/ln_1/scale", None),
    ("transformer.h.{l}.ln_1.bias", "h_{l}/ln_1/bias", None),
    ("transformer.h.{l}.attn.q_proj.weight", "h_{l}/attn/q_proj/kernel", "T"),
    ("transformer.h.{l}.attn.k_proj.weight", "h_{l}/attn/k_proj/kernel", "T"),
    ("transformer.h.{l}.attn.v_proj.weight", "h_{l}/attn/v_proj/kernel", "T"),
    ("transformer.h.{l}.attn.out_proj.weight", "h_{l}/attn/out_proj/kernel", "T"),
    ("transformer.h.{l}.mlp.fc_in.weight", "h_{l}/mlp/fc_in/kernel", "T"),
    ("transformer.h.{l}.mlp.fc_in.bias", "h_{l}/mlp/fc_in/bias", None),
    ("transformer.h.{l}.mlp.fc_out.weight", "h_{l}/mlp/fc_out/kernel", "T"),
    ("transformer.h.{l}.mlp.fc_out.bias", "h_{l}/mlp/fc_out/bias", None),
    ("transformer.ln_f.weight", "ln_f/scale", None),
    ("transformer.ln_f.bias", "ln_f/bias", None),
    ("lm_head.weight", "lm_head/kernel", "T"),
    ("lm_head.bias", "lm_head/bias", None),
)
# Causal-mask buffers (older checkpoints) and the precomputed sinusoids.
HF_IGNORE = (r"transformer\.h\.\d+\.attn\.(bias|masked_bias|embed_positions)$",)
