"""BERT in Flax (post-LayerNorm encoder) and `Encoder`, its public wrapper.

`BertEncoder` follows Devlin et al. (2019) as Hugging Face's `BertModel` does:
word + position + token-type embeddings, LayerNorm, then blocks of
`LN(x + attn(x))`, `LN(x + W_out gelu(W_in x))` with bidirectional attention
over the non-padding keys, and a tanh pooler on the first ([CLS]) token.
`Encoder.embed` gives sentence-transformers style embeddings (mean over real
tokens, L2-normalised), e.g. for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import adapters as adapters_lib
from keditjax.models import layers
from keditjax.models import sites as sites_lib
from keditjax.models.config import ModelConfig
from keditjax.models.sites import Sites

# Site -> the parameter leaf it writes (`{l}` is the layer).
SITE_PARAMS = {
    "embed": ("embeddings", "word_embeddings", "embedding"),
    "attn/out": ("layer_{l}", "attention", "output", "kernel"),
    "mlp/key": ("layer_{l}", "intermediate", "kernel"),
    "mlp/value": ("layer_{l}", "output", "kernel"),
}


class Embeddings(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, token_type_ids_BxL, positions_BxL):
    c = self.config
    init = nn.initializers.normal(0.02)
    x_BxLxD = (
        nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings",
                 embedding_init=init)(tokens_BxL)
        + nn.Embed(c.max_position_embeddings, c.hidden_size,
                   name="position_embeddings", embedding_init=init)(positions_BxL)
        + nn.Embed(c.type_vocab_size, c.hidden_size,
                   name="token_type_embeddings",
                   embedding_init=init)(token_type_ids_BxL))
    return layers.layer_norm(c, "LayerNorm")(x_BxLxD)


class SelfAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask):
    c = self.config
    b, l, d = x_BxLxD.shape
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
        layers.dense(d, name, True)(x_BxLxD).reshape(b, l, c.num_heads,
                                                     c.head_dim)
        for name in ("query", "key", "value"))
    o = layers.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask)
    return layers.dense(d, "output", True)(o.reshape(b, l, d))


class Layer(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxLxD, mask, sites: Sites, out: dict):
    c, site = self.config, f"layer/{self.layer}"
    attn_BxLxD = SelfAttention(c, name="attention")(x_BxLxD, mask)
    attn_BxLxD = sites.visit(f"{site}/attn/out", attn_BxLxD, out)
    x_BxLxD = layers.layer_norm(c, "attention_norm")(x_BxLxD + attn_BxLxD)
    in_BxLxD = sites.visit(f"{site}/mlp/in", x_BxLxD, out)
    key_BxLxF = layers.activation(c.activation)(
        layers.dense(c.intermediate_size, "intermediate", True)(in_BxLxD))
    key_BxLxF = sites.visit(f"{site}/mlp/key", key_BxLxF, out)
    value_BxLxD = layers.dense(c.hidden_size, "output", True)(key_BxLxF)
    value_BxLxD = sites.visit(f"{site}/mlp/value", value_BxLxD, out)
    x_BxLxD = layers.layer_norm(c, "output_norm")(x_BxLxD + value_BxLxD)
    return sites.visit(f"{site}/resid", x_BxLxD, out)


class BertEncoder(nn.Module):
  """BERT encoder: `(tokens, ...) -> (hidden_BxLxD, out, pooled_BxD)`.

  The 3-tuple mirrors the decoders' `(logits, out, cache)` contract. Without
  explicit `positions`, token `t` has position `t` (as in Hugging Face), so
  pad on the right.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, attention_mask=None, token_type_ids=None,
               positions=None, sites: Sites = Sites(), cache=None):
    if cache is not None:
      raise errors.ConfigError("BERT is an encoder and has no KV cache; "
                               "pass cache=None.")
    c = self.config
    batch, length = tokens_BxL.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    positions_BxL = jnp.asarray(positions, jnp.int32)
    k_pos_BxL = jnp.where(jnp.asarray(attention_mask).astype(bool),
                          positions_BxL, -1)
    mask = layers.attention_mask(positions_BxL, k_pos_BxL, causal=False)
    out = {}
    x_BxLxD = Embeddings(c, name="embeddings")(tokens_BxL, token_type_ids,
                                               positions_BxL)
    x_BxLxD = sites.visit("embed", x_BxLxD, out)
    for i in range(c.num_layers):
      x_BxLxD = Layer(c, i, name=f"layer_{i}")(x_BxLxD, mask, sites, out)
    pooled_BxD = jnp.tanh(
        layers.dense(c.hidden_size, "pooler", True)(x_BxLxD[:, 0]))
    return x_BxLxD, out, pooled_BxD


@functools.partial(jax.jit, static_argnames=("config",))
def encode(config: ModelConfig, params, tokens_BxL, attention_mask_BxL=None,
           token_type_ids_BxL=None, sites: Sites = sites_lib.NO_SITES):
  """Pure jitted encoder pass.

  Args:
    config: the model config (static).
    params: the parameter pytree.
    tokens_BxL: int token ids (with [CLS]/[SEP], right-padded).
    attention_mask_BxL: 1 for real tokens, 0 for padding (None: all real).
    token_type_ids_BxL: segment ids (None: all 0).
    sites: `Sites` to capture and patch.

  Returns:
    (hidden_BxLxD, pooled_BxD, captures).
  """
  params, adapters = adapters_lib.split(params)
  hidden, out, pooled = BertEncoder(config).apply(
      {"params": params}, tokens_BxL, attention_mask=attention_mask_BxL,
      token_type_ids=token_type_ids_BxL, sites=sites.with_adapters(adapters))
  return hidden, pooled, sites_lib.captures(out)


@jax.jit
def mean_pool(hidden_BxLxD, mask_BxL):
  """Mean of the real tokens' hidden states, L2-normalised: `[B, D]`."""
  mask_BxLx1 = mask_BxL[..., None].astype(hidden_BxLxD.dtype)
  mean_BxD = (hidden_BxLxD * mask_BxLx1).sum(1) / jnp.maximum(
      mask_BxLx1.sum(1), 1.0)
  norm_Bx1 = jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True)
  return mean_BxD / jnp.maximum(norm_Bx1, 1e-12)


# Hugging Face tensor name -> our parameter path, and the transform ("T":
# torch Linear [out, in] -> our [in, out] kernel). BertModel saves names
# without a prefix, the task models (BertForSequenceClassification, ...) with
# `bert.`; every row exists in both forms and export uses the first (BertModel).
_ROWS = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", None),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", None),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", None),
    ("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale", None),
    ("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias", None),
    ("encoder.layer.{l}.attention.self.query.weight", "layer_{l}/attention/query/kernel", "T"),
    ("encoder.layer.{l}.attention.self.query.bias", "layer_{l}/attention/query/bias", None),
    ("encoder.layer.{l}.attention.self.key.weight", "layer_{l}/attention/key/kernel", "T"),
    ("encoder.layer.{l}.attention.self.key.bias", "layer_{l}/attention/key/bias", None),
    ("encoder.layer.{l}.attention.self.value.weight", "layer_{l}/attention/value/kernel", "T"),
    ("encoder.layer.{l}.attention.self.value.bias", "layer_{l}/attention/value/bias", None),
    ("encoder.layer.{l}.attention.output.dense.weight", "layer_{l}/attention/output/kernel", "T"),
    ("encoder.layer.{l}.attention.output.dense.bias", "layer_{l}/attention/output/bias", None),
    ("encoder.layer.{l}.attention.output.LayerNorm.weight", "layer_{l}/attention_norm/scale", None),
    ("encoder.layer.{l}.attention.output.LayerNorm.bias", "layer_{l}/attention_norm/bias", None),
    ("encoder.layer.{l}.intermediate.dense.weight", "layer_{l}/intermediate/kernel", "T"),
    ("encoder.layer.{l}.intermediate.dense.bias", "layer_{l}/intermediate/bias", None),
    ("encoder.layer.{l}.output.dense.weight", "layer_{l}/output/kernel", "T"),
    ("encoder.layer.{l}.output.dense.bias", "layer_{l}/output/bias", None),
    ("encoder.layer.{l}.output.LayerNorm.weight", "layer_{l}/output_norm/scale", None),
    ("encoder.layer.{l}.output.LayerNorm.bias", "layer_{l}/output_norm/bias", None),
    ("pooler.dense.weight", "pooler/kernel", "T"),
    ("pooler.dense.bias", "pooler/bias", None),
)
HF_TABLE = tuple((prefix + hf_name, path, transform)
                 for prefix in ("", "bert.") for hf_name, path, transform in _ROWS)
# The position-id buffer (`arange`) some checkpoints carry. Pretraining heads
# (`cls.*`) are deliberately not ignored: they are refused as unmapped.
# `cls.*` are the pre-training heads (masked LM, next sentence) of checkpoints
# such as bert-base-uncased: keditjax loads the encoder + pooler only.
HF_IGNORE = (r"(bert\.)?embeddings\.position_ids$", r"cls\.(predictions|seq_relationship)\.")
