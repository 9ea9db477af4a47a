"""Math shared by the architectures: RoPE, attention masks, attention, MLPs.

Pure functions on arrays; the Flax modules in `llama.py`, `gpt2.py`, `gptj.py`
and `bert.py` call them. Shapes: B batch, L query length, S key length,
H query heads, G key/value heads, K head dim, D model dim, F MLP dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keditjax.models.config import ModelConfig

# A large finite negative instead of -inf, so a fully masked row (a padding
# query) gives a uniform distribution rather than NaN.
MASK_VALUE = -1e30


def activation(name: str):
  """The MLP non-linearity `name` as a function."""
  return {
      "silu": jax.nn.silu,
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  }[name]


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies `[R/2]` with the config's scaling applied.

  Follows Su et al. (2021); "linear" divides every frequency by `factor`
  (position interpolation), "llama3" rescales only the low frequencies with a
  smooth ramp between `low_freq_factor` and `high_freq_factor` (Llama 3.1).
  """
  dim = config.rotary_dim or config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = config.rope_scaling_dict
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old_len / low, inv_freq / factor,
                        np.where(wavelen < old_len / high, inv_freq, smoothed))
  return inv_freq.astype(np.float32)


def apply_rope(x_BxLxHxK, positions_BxL, inv_freq, *, interleaved=False):
  """Rotates the first `2*len(inv_freq)` features of each head by position.

  `interleaved=False` rotates halves (x[:R/2], x[R/2:]) as Llama/GPT-NeoX do;
  `interleaved=True` rotates adjacent pairs (x0, x1), (x2, x3) as GPT-J does.
  Features past the rotary width pass through unchanged.
  """
  rot = 2 * inv_freq.shape[0]
  angles_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxLxR2)[:, :, None, :]
  sin = jnp.sin(angles_BxLxR2)[:, :, None, :]
  x_rot, x_pass = x_BxLxHxK[..., :rot], x_BxLxHxK[..., rot:]
  if interleaved:
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = out.reshape(x_rot.shape)
  else:
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([out.astype(x_BxLxHxK.dtype), x_pass], axis=-1)


def attention_mask(q_pos_BxL, k_pos_BxS, *, causal=True, window=None):
  """Boolean `[B, 1, L, S]` mask from query and key positions.

  A key position of -1 marks padding (or an empty cache slot). Causality and
  sliding windows are decided on positions, so left padding, right padding and
  a KV cache all use the same rule.
  """
  q = q_pos_BxL[:, :, None]
  k = k_pos_BxS[:, None, :]
  mask = k >= 0
  if causal:
    mask &= k <= q
  if window is not None:
    mask &= q - k < window
  return mask[:, None]


def dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS):
  """Softmax attention with grouped key/value heads (GQA), float32 softmax."""
  b, l, h, kdim = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(b, l, g, h // g, kdim)
  scores = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK,
                      preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(kdim))
  scores = jnp.where(mask_Bx1xLxS[:, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
  out = jnp.einsum("bgrls,bsgk->blgrk", probs, v_BxSxGxK)
  return out.reshape(b, l, h, kdim)


def cached_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask, layer_cache,
                     index):
  """Attention over the new keys/values, or over the cache once they are in it.

  Returns:
    (output_BxLxHxK, the updated layer cache or None).
  """
  if layer_cache is None:
    return dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask), None
  k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k_BxLxGxK,
                                              index, axis=1)
  v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v_BxLxGxK,
                                              index, axis=1)
  return (dot_product_attention(q_BxLxHxK, k_all, v_all, mask),
          {"k": k_all, "v": v_all})


class GeluMLP(nn.Module):
  """Dense -> activation -> dense with biases (GPT-2, GPT-J), visiting sites.

  `in_name`/`out_name` are the two projections' parameter names.
  """
  config: ModelConfig
  layer: int
  in_name: str
  out_name: str

  @nn.compact
  def __call__(self, x_BxLxD, sites, out: dict):
    c = self.config
    x_BxLxD = sites.visit(f"layer/{self.layer}/mlp/in", x_BxLxD, out)
    key_BxLxF = activation(c.activation)(
        dense(c.intermediate_size, self.in_name, True)(x_BxLxD))
    key_BxLxF = sites.visit(f"layer/{self.layer}/mlp/key", key_BxLxF, out)
    value_BxLxD = dense(c.hidden_size, self.out_name, True)(key_BxLxF)
    return sites.visit(f"layer/{self.layer}/mlp/value", value_BxLxD, out)


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  """LayerNorm with the config's epsilon and torch's two-pass variance."""
  return nn.LayerNorm(epsilon=config.norm_eps, name=name,
                      use_fast_variance=False)


def dense(features: int, name: str, use_bias: bool, dtype=jnp.float32):
  """`nn.Dense` with `[in, out]` kernel, the orientation edits assume."""
  return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype,
                  param_dtype=dtype,
                  kernel_init=nn.initializers.normal(0.02))


def positions_and_mask(config: ModelConfig, tokens_BxL, positions_BxL,
                       attention_mask_BxL, cache):
  """Query positions, the attention mask and the updated cache positions.

  Args:
    config: model config (sliding window).
    tokens_BxL: input ids (for the shape).
    positions_BxL: explicit positions, or None for `cumsum(mask) - 1` (so left
      padding and a KV cache give the same positions as an unpadded prompt).
    attention_mask_BxL: 1 for real tokens, 0 for padding; None for all ones.
    cache: None, or a cache dict from `init_cache` whose `pos` holds the key
      positions already written (-1 for empty slots) and `index` the next slot.

  Returns:
    (q_pos_BxL, mask_Bx1xLxS, cache_pos_BxS or None).
  """
  batch, length = tokens_BxL.shape[:2]
  if attention_mask_BxL is None:
    attention_mask_BxL = jnp.ones((batch, length), jnp.int32)
  valid_BxL = attention_mask_BxL.astype(bool)
  if positions_BxL is None:
    offset = 0 if cache is None else (jnp.max(cache["pos"], axis=1,
                                              keepdims=True) + 1)
    positions_BxL = jnp.cumsum(valid_BxL, axis=1) - 1 + offset
    positions_BxL = jnp.maximum(positions_BxL, 0)
  positions_BxL = positions_BxL.astype(jnp.int32)
  k_pos_BxL = jnp.where(valid_BxL, positions_BxL, -1)
  if cache is None:
    k_pos_BxS, cache_pos = k_pos_BxL, None
  else:
    cache_pos = jax.lax.dynamic_update_slice_in_dim(
        cache["pos"], k_pos_BxL, cache["index"], axis=1)
    k_pos_BxS = cache_pos
  mask = attention_mask(positions_BxL, k_pos_BxS, causal=True,
                        window=config.sliding_window)
  return positions_BxL, mask, cache_pos


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.float32):
  """An empty KV cache for `size` token slots: per-layer k/v, key positions."""
  shape = (batch, size, config.num_kv_heads, config.head_dim)
  return {
      "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers)],
      "pos": jnp.full((batch, size), -1, jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def finish_cache(cache, new_layers, cache_pos, length):
  """The cache after a forward pass over `length` new tokens.

  `new_layers` maps a layer index to its updated cache; layers a partial
  forward pass did not run keep their old entries.
  """
  if cache is None:
    return None
  merged = list(cache["layers"])
  for i, layer_cache in new_layers.items():
    merged[i] = layer_cache
  return {"layers": merged, "pos": cache_pos,
          "index": cache["index"] + length}


def layer_span(config: ModelConfig, start_layer: int, stop_layer):
  """Checks and completes a `[start, stop)` block range of a partial pass."""
  stop = config.num_layers if stop_layer is None else stop_layer
  if not 0 <= start_layer <= stop <= config.num_layers:
    raise ValueError(f"layer span [{start_layer}, {stop}) is outside "
                     f"[0, {config.num_layers}].")
  return start_layer, stop


def gather_positions(x_BxLxD, positions_BxT):
  """`x[b, positions[b, t]]` -> `[B, T, D]` (logits only where needed)."""
  if positions_BxT is None:
    return x_BxLxD
  return jnp.take_along_axis(
      x_BxLxD, jnp.asarray(positions_BxT, jnp.int32)[..., None], axis=1)
