"""`LanguageModel`: the public object `keditjax.models.load` returns.

It bundles a config, a parameter pytree and a tokenizer with pure, jitted
functions of explicit params: `apply` (logits, optionally with edit sites),
`score` (log-probabilities of continuations), `generate` (KV-cached decoding).
Params are always an argument, so an edited pytree is scored with the same
compiled code as the original one.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import adapters as adapters_lib
from keditjax.models import layers, registry, routed
from keditjax.models import sites as sites_lib
from keditjax.models.config import ModelConfig
from keditjax.models.sites import Sites


def bucket(n: int, multiple: int = 16) -> int:
  """Rounds `n` up to a multiple of `multiple` so shapes (and compiles) repeat."""
  return max(multiple, -(-n // multiple) * multiple)


def apply_module(config: ModelConfig, params, *args,
                 sites: Sites = sites_lib.NO_SITES, **kwargs):
  """`module.apply` of the architecture, honouring `params["adapters"]`.

  The one place every decoder pass (forward, partial, scoring, generation)
  goes through: adapters are split off the params and applied at their
  sites (see `keditjax.models.adapters`).
  """
  params, adapters = adapters_lib.split(params)
  module = registry.get_arch(config.arch).module(config)
  result, out, extra = module.apply({"params": params}, *args,
                                    sites=sites.with_adapters(adapters),
                                    **kwargs)
  return result, sites_lib.captures(out), extra


def run(config: ModelConfig, params, tokens_BxL=None, *, hidden=None,
        start_layer: int = 0, stop_layer=None, logit_positions=None,
        attention_mask=None, positions=None, sites: Sites = sites_lib.NO_SITES,
        cache=None):
  """One (possibly partial) forward pass, un-jitted, for use inside jit.

  Args:
    config, params: the model.
    tokens_BxL: int ids (None when `hidden` is given).
    hidden: residual stream `[B, L, D]` entering block `start_layer`.
    start_layer, stop_layer: run blocks `[start_layer, stop_layer)` (static).
    logit_positions: int `[B, T]`: compute logits only there.
    attention_mask, positions, sites: as in `forward`.
    cache: a KV cache (`layers.init_cache`) holding earlier positions.

  Returns:
    `(logits or residual stream, captures, new cache or None)`.
  """
  return apply_module(config, params, tokens_BxL, positions=positions,
                      attention_mask=attention_mask, sites=sites, cache=cache,
                      hidden=hidden, start_layer=start_layer,
                      stop_layer=stop_layer, logit_positions=logit_positions)


def stack_blocks(config: ModelConfig, params, start_layer: int, cache=None):
  """Blocks `[start_layer, L)`'s parameters (and cache) on a leading axis.

  Returns:
    `{"params": ..., "cache": ...}` (no "cache" without one), the `xs` of
    `run_scanned`'s scan.
  """
  arch = registry.get_arch(config.arch)
  start, stop = layers.layer_span(config, start_layer, None)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  out = {"params": stack([params[arch.block_name.format(l=i)]
                          for i in range(start, stop)])}
  if cache is not None:
    out["cache"] = stack(cache["layers"][start:stop])
  return out


def blocks_and_cache(config, blocks, start_layer, cache):
  """`stack_blocks`' result from `blocks` stacked by the caller (only the
  small cache is stacked here); None for None."""
  if blocks is None:
    return None
  start, stop = layers.layer_span(config, start_layer, None)
  n = jax.tree.leaves(blocks)[0].shape[0]
  if n != stop - start:
    raise ValueError(f"blocks hold {n} layers; [{start}, {stop}) needs "
                     f"{stop - start}.")
  out = {"params": blocks}
  if cache is not None:
    out["cache"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                *cache["layers"][start:stop])
  return out


def run_scanned(config: ModelConfig, params, hidden, *, start_layer: int,
                attention_mask=None, cache=None, logit_positions=None,
                stacked=None, blocks=None):
  """Blocks `[start_layer, L)` as one `lax.scan`, then the LM head.

  Equal to `run(..., hidden=hidden, start_layer=start_layer)` but traced
  once per block instead of once per layer, so a jitted loop over many
  blocks (the v* optimisation) compiles in seconds. No sites; the cache is
  read, not returned. Params with adapters run the unrolled `run` instead
  (adapters sit at one layer's sites, which a scan over layers cannot
  address), with the same result.

  Args:
    config, params: the model.
    hidden: residual stream `[B, L, D]` entering block `start_layer`.
    start_layer: first block (static).
    attention_mask, cache, logit_positions: as in `run`.
    stacked: `stack_blocks(config, params, start_layer, cache)`, when the
      caller keeps it (e.g. outside a loop); computed here otherwise.
    blocks: `stack_blocks(config, params, start_layer)["params"]` made by
      the caller outside the jitted function: the scan then reads this
      argument in place, where stacking inside a jitted function writes a
      copy of every block's weights on each call (~40% of a v* step's
      temporary memory on SmolLM2).

  Returns:
    logits `[B, T or L, V]`.
  """
  if adapters_lib.has_adapters(params):
    logits, _, _ = run(config, params, hidden=hidden, start_layer=start_layer,
                       attention_mask=attention_mask, cache=cache,
                       logit_positions=logit_positions)
    return logits
  if stacked is None:
    stacked = blocks_and_cache(config, blocks, start_layer, cache)
  x_BxLxD, _, _ = _scan_blocks(config, params, hidden, start_layer,
                                attention_mask, cache, stacked,
                                keep_cache=False)
  logits, _, _ = run(config, params, hidden=x_BxLxD,
                     start_layer=config.num_layers,
                     logit_positions=logit_positions)
  return logits


def _scan_blocks(config, params, hidden, start_layer, attention_mask, cache,
                 stacked, keep_cache):
  """Blocks `[start_layer, L)` under one `lax.scan`: (x, new layer caches or
  None, the cache's new key positions)."""
  arch = registry.get_arch(config.arch)
  if arch.apply_block is None:
    raise errors.ConfigError(f"{config.arch} has no scannable decoder blocks.")
  start, _ = layers.layer_span(config, start_layer, None)
  positions_BxL, mask, cache_pos = layers.positions_and_mask(
      config, hidden, None, attention_mask, cache)
  if stacked is None:
    stacked = stack_blocks(config, params, start, cache)
  index = None if cache is None else cache["index"]

  def body(x_BxLxD, block):
    x_BxLxD, new_cache = arch.apply_block(config, block["params"], x_BxLxD,
                                          positions_BxL, mask,
                                          block.get("cache"), index)
    return x_BxLxD, (new_cache if keep_cache else None)

  x_BxLxD, new_caches = jax.lax.scan(body, hidden, stacked)
  return x_BxLxD, new_caches, cache_pos


def prefill_scanned(config: ModelConfig, params, tokens_BxL, *,
                    attention_mask, cache, scan_from: int = 0, blocks=None):
  """A full forward pass that only fills `cache`, with the blocks scanned.

  Equal to `run(config, params, tokens_BxL, attention_mask=..., cache=...)`'s
  new cache, but traced once per block instead of once per layer (a prefix
  pass in a one-off jitted program compiles in a fraction of the time).

  Args:
    config, params, tokens_BxL, attention_mask, cache: as in `run`.
    scan_from: blocks below it run unrolled, the rest under one scan.
    blocks: the stacked params of blocks `[scan_from, L)` (see
      `run_scanned`), or None to stack them here.

  Returns:
    The cache after the pass (`layers.finish_cache`).
  """
  if adapters_lib.has_adapters(params):  # see run_scanned
    return run(config, params, tokens_BxL, attention_mask=attention_mask,
               cache=cache)[2]
  hidden_BxLxD, _, low = run(config, params, tokens_BxL, stop_layer=scan_from,
                             attention_mask=attention_mask,
                             cache=cache if scan_from else None)
  if scan_from == config.num_layers:  # nothing left to scan
    return low
  _, stacked_caches, cache_pos = _scan_blocks(
      config, params, hidden_BxLxD, scan_from, attention_mask, cache,
      blocks_and_cache(config, blocks, scan_from, cache), keep_cache=True)
  new_layers = {i: low["layers"][i] for i in range(scan_from)}
  new_layers.update({i: jax.tree.map(lambda a, k=i - scan_from: a[k],
                                     stacked_caches)
                     for i in range(scan_from, config.num_layers)})
  return layers.finish_cache(cache, new_layers, cache_pos,
                             tokens_BxL.shape[1])


@functools.partial(jax.jit, static_argnames=("config",))
def forward(config: ModelConfig, params, tokens_BxL, attention_mask_BxL=None,
            positions_BxL=None, sites: Sites = sites_lib.NO_SITES):
  """Pure jitted forward pass: `(logits_BxLxV, captures)`.

  Args:
    config: the model config (static).
    params: the parameter pytree.
    tokens_BxL: int token ids.
    attention_mask_BxL: 1 for real tokens, 0 for padding (None: all real).
    positions_BxL: explicit positions (None: from the mask).
    sites: `Sites` to capture and patch.

  Returns:
    logits `[B, L, V]` (float32) and a dict of captured activations.
  """
  logits, out, _ = apply_module(config, params, tokens_BxL,
                                positions=positions_BxL,
                                attention_mask=attention_mask_BxL, sites=sites)
  return logits, out


@jax.jit
def _token_logprobs(logits_BxLxV, tokens_BxL):
  """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: `[B, L-1]`."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


def _nucleus_cutoff(probs_BxV, top_p, iters: int = 32):
  """Per row, the largest t with sum(p[p >= t]) >= top_p, by bisection.

  Keeping `p >= t` is the nucleus (the smallest set of most likely tokens
  whose mass reaches top_p) without sorting the vocabulary: a sort of a
  [32, 49152] array costs ~0.3 s on a CPU, 32 masked sums a few ms.
  """
  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    mass = jnp.sum(jnp.where(probs_BxV >= mid[:, None], probs_BxV, 0.0), -1)
    ok = mass >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
  lo = jnp.zeros(probs_BxV.shape[:1], probs_BxV.dtype)
  hi = jnp.max(probs_BxV, axis=-1)
  # If the top token alone reaches top_p, keep exactly it.
  top_alone = hi >= top_p
  lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
  return jnp.where(top_alone, hi, lo)


def _sample(logits_BxV, rng, temperature, top_p):
  """Greedy when temperature == 0, else nucleus (top-p) sampling."""
  def sample(logits_BxV):
    scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled, axis=-1)
    cutoff = _nucleus_cutoff(probs, top_p)
    scaled = jnp.where(probs >= cutoff[:, None], scaled, -jnp.inf)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  def greedy(logits_BxV):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy, logits_BxV)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens",
                                             "cache_size"))
def generate_tokens(config: ModelConfig, params, tokens_BxP, mask_BxP, rng,
                    temperature, top_p, *, max_new_tokens: int,
                    cache_size: int, eos_id=-1):
  """Decodes `max_new_tokens` after left-padded prompts with a KV cache.

  One prefill pass fills the cache, then a `lax.scan` feeds one token at a
  time; rows that emitted `eos_id` keep emitting it.

  Returns:
    int32 `[B, max_new_tokens]` new token ids.
  """
  batch = tokens_BxP.shape[0]
  cache = layers.init_cache(config, batch, cache_size,
                            jax.tree.leaves(adapters_lib.split(params)[0])[0]
                            .dtype)

  def step(params, tokens, mask, cache):
    logits, _, cache = apply_module(config, params, tokens,
                                    attention_mask=mask, cache=cache)
    return logits[:, -1], cache

  logits_BxV, cache = step(params, tokens_BxP, mask_BxP, cache)
  rng, sub = jax.random.split(rng)
  first = _sample(logits_BxV, sub, temperature, top_p)

  def body(carry, _):
    token, done, cache, rng = carry
    logits_BxV, cache = step(params, token[:, None],
                             jnp.ones((batch, 1), jnp.int32), cache)
    rng, sub = jax.random.split(rng)
    nxt = _sample(logits_BxV, sub, temperature, top_p)
    done = done | (token == eos_id)
    nxt = jnp.where(done, eos_id, nxt)
    return (nxt, done, cache, rng), nxt

  init = (first, jnp.zeros((batch,), bool), cache, rng)
  _, rest = jax.lax.scan(body, init, None, length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


class ModelBase:
  """What decoders and encoders share: config, params, tokenizer, sites.

  Attributes:
    config: `ModelConfig`.
    params: the parameter pytree (nested dicts of arrays).
    tokenizer: a `keditjax.models.tokenizer.Tokenizer` (or None).
    name: where it was loaded from.
  """

  def __init__(self, config: ModelConfig, params, tokenizer=None, name=""):
    self.config = config
    # Numpy leaves (fresh from a loader) would be copied to the device on
    # every call; place them once. Already-placed (e.g. sharded) arrays stay.
    # (`device_put` copies once; `jnp.asarray` of a numpy array holds two
    # copies at its peak.)
    self.params = jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)
    self.tokenizer = tokenizer
    self.name = name

  def __repr__(self):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    return (f"{type(self).__name__}({self.name or self.config.hf_model_type}, "
            f"{self.config.num_layers} layers, {n / 1e6:.1f}M params)")

  def site_names(self) -> tuple[str, ...]:
    """Every edit-site name of this model."""
    return sites_lib.site_names(self.config.num_layers)

  def site_param(self, site: str) -> tuple[str, ...]:
    """The parameter path a site writes (`mlp/value` -> MLP output kernel)."""
    return registry.site_param_path(self.config, site)

  def check_params(self, params):
    """Raises `SiteError` for adapters at sites this model does not have."""
    sites_lib.check_adapters(adapters_lib.split(params)[1],
                             self.config.num_layers)

  def _check_tokens(self, tokens):
    if isinstance(tokens, jax.core.Tracer):
      return tokens
    arr = np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise errors.InputError(
          f"tokens must be an int array [batch, length], got {arr.dtype} "
          f"{arr.shape}.")
    if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
      raise errors.InputError(
          f"token ids must lie in [0, {self.config.vocab_size}); got "
          f"[{arr.min()}, {arr.max()}].")
    if arr.shape[1] > self.config.max_position_embeddings:
      raise errors.InputError(
          f"{arr.shape[1]} tokens exceed max_position_embeddings="
          f"{self.config.max_position_embeddings}.")
    return jnp.asarray(arr, jnp.int32)


class LanguageModel(ModelBase):
  """A decoder language model: config, params, tokenizer and pure functions."""

  def __init__(self, config: ModelConfig, params, tokenizer=None, name=""):
    if not config.is_decoder:
      raise errors.ConfigError(f"{config.arch} is not a decoder; use Encoder.")
    super().__init__(config, params, tokenizer, name)

  def _forward(self, params, tokens_BxL, attention_mask_BxL=None,
               positions_BxL=None, sites=sites_lib.NO_SITES):
    """The forward pass `apply` and `score` run (subclasses may shard it)."""
    return forward(self.config, params, tokens_BxL, attention_mask_BxL,
                   positions_BxL, sites)

  def apply(self, params, tokens_BxL, *, sites: Sites | None = None,
            attention_mask=None, positions=None):
    """Logits `[B, L, V]`; with `sites`, `(logits, captures)`.

    Args:
      params: the parameter pytree (the model's own or an edited copy).
      tokens_BxL: int token ids.
      sites: optional `Sites` (capture and patch named activations).
      attention_mask: 1 for real tokens, 0 for padding.
      positions: explicit positions (default: from the mask).
    """
    tokens_BxL = self._check_tokens(tokens_BxL)
    self.check_params(params)
    if sites is not None:
      sites.validate(self.config.num_layers)
    logits, out = self._forward(params, tokens_BxL, attention_mask, positions,
                                sites or sites_lib.NO_SITES)
    return logits if sites is None else (logits, out)

  # -- scoring -----------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    if self.tokenizer is None:
      raise errors.TokenizerError(f"{self!r} has no tokenizer.")
    return self.tokenizer.encode(text)

  def _pair_ids(self, prompts, continuations):
    if isinstance(prompts, str) or isinstance(continuations, str):
      raise errors.InputError("score takes lists of prompts and continuations.")
    if len(prompts) != len(continuations):
      raise errors.InputError(
          f"score got {len(prompts)} prompts but {len(continuations)} "
          "continuations.")
    pairs = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
      p_ids = self.encode(p) if isinstance(p, str) else list(p)
      c_ids = self.encode(c) if isinstance(c, str) else list(c)
      if not p_ids:
        raise errors.InputError(f"prompt {i} ({p!r}) is empty.")
      if not c_ids:
        raise errors.InputError(f"continuation {i} ({c!r}) is empty.")
      pairs.append((p_ids, c_ids))
    return pairs

  def score(self, params, prompts: Sequence, continuations: Sequence, *,
            reduction: str = "sum", batch_size: int = 16):
    """Log-probabilities of `continuations` given `prompts`.

    Prompt and continuation are tokenized separately and concatenated (as in
    the ROME evaluation code); batches are right-padded to length buckets so
    repeated calls reuse one compilation.

    Args:
      params: parameter pytree.
      prompts, continuations: equal-length lists of strings (or id lists).
      reduction: "sum" (log p of the whole continuation), "mean" (per-token
        mean) or "none" (a list of per-token arrays).
      batch_size: rows per forward pass.

    Returns:
      float32 numpy `[N]` for "sum"/"mean", else a list of `[T_i]` arrays.
    """
    if reduction not in ("sum", "mean", "none"):
      raise errors.InputError(f"reduction={reduction!r}; use sum, mean or none.")
    params, prompts = routed.resolve(self, params, prompts)
    pairs = self._pair_ids(prompts, continuations)
    self.check_params(params)
    per_token = []
    for start in range(0, len(pairs), batch_size):
      chunk = pairs[start:start + batch_size]
      length = bucket(max(len(p) + len(c) for p, c in chunk))
      tokens = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for row, (p, c) in enumerate(chunk):
        ids = p + c
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
      logits, _ = self._forward(params, jnp.asarray(tokens),
                                jnp.asarray(mask))
      lp = np.asarray(_token_logprobs(logits, jnp.asarray(tokens)))
      for row, (p, c) in enumerate(chunk):
        per_token.append(lp[row, len(p) - 1:len(p) + len(c) - 1])
    if reduction == "none":
      return per_token
    fn = np.sum if reduction == "sum" else np.mean
    return np.array([fn(x) for x in per_token], np.float32)

  # -- generation --------------------------------------------------------
  def generate(self, params, prompt, max_new_tokens: int = 20, *,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop_at_eos: bool = True, return_ids: bool = False):
    """Continues `prompt` (a string or a list of strings).

    Greedy when `temperature == 0`, else nucleus sampling. Prompts are
    left-padded to a length bucket and decoded with a KV cache in one jitted
    call.

    Args:
      params: parameter pytree.
      prompt: a string or a list of token ids, or a list of those.
      max_new_tokens: tokens to generate (static: one compile per value).
      temperature, top_p, seed: sampling controls.
      stop_at_eos: cut each continuation at the tokenizer's EOS.
      return_ids: return token ids instead of text.

    Returns:
      The continuation text (a list for a list of prompts); with
      `return_ids`, the token ids instead.
    """
    if max_new_tokens < 1:
      raise errors.InputError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    # One prompt is a str or a list of ids; several are a list of those.
    single = isinstance(prompt, str) or (
        len(prompt) > 0 and isinstance(prompt[0], (int, np.integer)))
    prompts = [prompt] if single else list(prompt)
    # An input-routing edited model (SERAC) rewrites prompts for its base.
    params, prompts = routed.resolve(self, params, prompts)
    self.check_params(params)
    ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p]
           for p in prompts]
    for p, i in zip(prompts, ids):
      if not i:
        raise errors.InputError(f"prompt {p!r} is empty.")
    longest = max(map(len, ids))
    if longest + max_new_tokens > self.config.max_position_embeddings:
      raise errors.InputError(
          f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
          f"exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}.")
    length = bucket(longest)
    batch = len(ids)
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, i in enumerate(ids):
      tokens[row, length - len(i):] = i
      mask[row, length - len(i):] = 1
    eos = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer and
                                    self.tokenizer.eos_id is not None) else -1
    new = generate_tokens(self.config, params, jnp.asarray(tokens),
                          jnp.asarray(mask), jax.random.key(seed),
                          jnp.float32(temperature), jnp.float32(top_p),
                          max_new_tokens=max_new_tokens,
                          cache_size=bucket(length + max_new_tokens),
                          eos_id=eos)
    new = np.asarray(new).tolist()
    if eos >= 0:
      new = [row[:row.index(eos)] if eos in row else row for row in new]
    if return_ids:
      return new[0] if single else new
    texts = [self.tokenizer.decode(row) for row in new]
    return texts[0] if single else texts
