"""Batched, jitted teacher-forced scoring of (prompt, target) pairs.

For every pair the model runs once on `prompt + target` (tokenized
separately and concatenated, as the ROME and EasyEdit evaluation code do;
the target gets one leading space) and returns, for each target token, its
log-probability and the model's top-1 token at that position. Every metric of
the harness is a function of these.

Pairs are sorted by length and packed into batches whose row count is a power
of two (at most `batch_size`) and whose length is a multiple of 16, so a few
compiled shapes serve a whole evaluation. The output head, log-softmax, gather
and argmax run on the device only at the positions that predict target tokens
(`logit_positions`), and only `[B, T]` arrays come back to the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import lm
from keditjax.models import routed


@dataclasses.dataclass(frozen=True)
class Scored:
  """Teacher-forced results for one target: per-token arrays `[T]`."""
  logprobs: np.ndarray   # log p(target token t | prompt, target[:t])
  argmax: np.ndarray     # the model's top-1 token at that position
  target: np.ndarray     # the target token ids

  @property
  def correct(self) -> np.ndarray:
    return self.argmax == self.target


@functools.partial(jax.jit, static_argnames=("config",))
def _target_stats(config, params, tokens_BxL, mask_BxL, positions_BxT,
                  targets_BxT):
  """Log-prob and top-1 token of each target token: the head and softmax run
  only at the `[B, T]` positions that predict a target token."""
  logits, _, _ = lm.run(config, params, tokens_BxL, attention_mask=mask_BxL,
                        logit_positions=positions_BxT)
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _space(text: str) -> str:
  return text if text.startswith(" ") else " " + text


def tokenize_pairs(model, prompts: Sequence[str], targets: Sequence[str]):
  """(prompt ids, target ids) per pair, validated."""
  if len(prompts) != len(targets):
    raise errors.InputError(
        f"{len(prompts)} prompts but {len(targets)} targets.")
  cache = {}

  def ids(text):
    if text not in cache:
      cache[text] = model.encode(text)
    return cache[text]

  pairs = []
  for i, (p, t) in enumerate(zip(prompts, targets)):
    if not isinstance(t, str) or not t.strip():
      raise errors.InputError(f"pair {i}: empty target for prompt {p!r}.")
    p_ids, t_ids = ids(p), ids(_space(t))
    if not p_ids:
      raise errors.InputError(f"pair {i}: empty prompt.")
    pairs.append((p_ids, t_ids))
  return pairs


def teacher_forced(model, params, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int = 64) -> list[Scored]:
  """Scores each `targets[i]` after `prompts[i]` under `params`.

  Args:
    model: a `LanguageModel`.
    params: its parameter pytree (edited or not), or a `routed.Routed`
      edited model (its prompts are rewritten first).
    prompts, targets: equal-length lists of strings.
    batch_size: most rows per forward pass (a power of two is best).

  Returns:
    One `Scored` per pair, in input order.
  """
  # An input-routing edited model (SERAC) rewrites prompts for its base.
  params, prompts = routed.resolve(model, params, prompts)
  pairs = tokenize_pairs(model, prompts, targets)
  if hasattr(model, "check_params"):
    model.check_params(params)
  order = sorted(range(len(pairs)), key=lambda i: sum(map(len, pairs[i])))
  out: list[Scored | None] = [None] * len(pairs)
  limit = model.config.max_position_embeddings
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    rows = 1 << (len(chunk) - 1).bit_length()
    length = lm.bucket(max(sum(map(len, pairs[i])) for i in chunk))
    if length > limit:
      length = max(sum(map(len, pairs[i])) for i in chunk)
      if length > limit:
        raise errors.InputError(
            f"a prompt + target is {length} tokens; the model takes {limit}.")
    width = lm.bucket(max(len(pairs[i][1]) for i in chunk), 4)
    tokens = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    where = np.zeros((rows, width), np.int32)
    targets = np.zeros((rows, width), np.int32)
    for row, i in enumerate(chunk):
      p, t = pairs[i]
      tokens[row, :len(p) + len(t)] = p + t
      mask[row, :len(p) + len(t)] = 1
      where[row, :len(t)] = np.arange(len(p) - 1, len(p) + len(t) - 1)
      targets[row, :len(t)] = t
    lp, am = jax.device_get(_target_stats(
        model.config, params, jnp.asarray(tokens), jnp.asarray(mask),
        jnp.asarray(where), jnp.asarray(targets)))
    for row, i in enumerate(chunk):
      t = pairs[i][1]
      out[i] = Scored(lp[row, :len(t)].copy(), am[row, :len(t)].copy(),
                      np.asarray(t))
  return out
