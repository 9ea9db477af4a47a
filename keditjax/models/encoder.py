"""`Encoder`: the public object for BERT-class encoders (sentence embeddings).

The Flax module, its HF table and the pure `encode` pass live in `bert.py`;
this class adds the config, params and tokenizer around them, as
`lm.LanguageModel` does for decoders (kept apart so that `bert.py`, which
`registry` imports, does not import `lm`).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.models import sites as sites_lib
from keditjax.models.bert import encode, mean_pool
from keditjax.models.config import ModelConfig
from keditjax.models.lm import ModelBase, bucket
from keditjax.models.sites import Sites


class Encoder(ModelBase):
  """A BERT encoder: config, params, tokenizer and pure functions.

  Attributes:
    config: `ModelConfig` (arch "bert").
    params: the parameter pytree.
    tokenizer: a `keditjax.models.tokenizer.Tokenizer` (or None).
    name: where it was loaded from.
  """

  def __init__(self, config: ModelConfig, params, tokenizer=None, name=""):
    if config.is_decoder:
      raise errors.ConfigError(
          f"{config.arch} is a decoder; use LanguageModel.")
    super().__init__(config, params, tokenizer, name)

  def apply(self, params, tokens_BxL, *, attention_mask=None,
            token_type_ids=None, sites: Sites | None = None):
    """Hidden states and pooled output; with `sites`, also the captures.

    Args:
      params: the parameter pytree (the model's own or an edited copy).
      tokens_BxL: int token ids.
      attention_mask: 1 for real tokens, 0 for padding.
      token_type_ids: segment ids (default 0).
      sites: optional `Sites` (capture and patch named activations).

    Returns:
      `(hidden_BxLxD, pooled_BxD)`, or `(hidden, pooled, captures)` with sites.
    """
    tokens = self._check_tokens(tokens_BxL)
    if sites is not None:
      sites.validate(self.config.num_layers)
    hidden, pooled, out = encode(self.config, params, tokens,
                                 attention_mask, token_type_ids,
                                 sites or sites_lib.NO_SITES)
    return (hidden, pooled) if sites is None else (hidden, pooled, out)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids with [CLS]/[SEP] for each text, without the tokenizer's padding."""
    if self.tokenizer is None:
      raise errors.TokenizerError(f"{self!r} has no tokenizer.")
    # `Tokenizer` disables the file's own padding; we pad to our buckets.
    ids = self.tokenizer.encode_batch(texts, add_special_tokens=True)
    for text, row in zip(texts, ids):
      if len(row) > self.config.max_position_embeddings:
        raise errors.InputError(
            f"{text[:40]!r}... has {len(row)} tokens, more than "
            f"max_position_embeddings={self.config.max_position_embeddings}.")
    return ids

  def embed(self, params, texts, *, batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings: mean of the last hidden states, L2-normalised.

    As sentence-transformers computes them (e.g. all-MiniLM-L6-v2). Batches
    are right-padded to length buckets so repeated calls reuse compilations.

    Args:
      params: parameter pytree.
      texts: a string or a list of strings.
      batch_size: rows per forward pass.

    Returns:
      float32 `[N, D]` unit vectors (`[D]` for a single string).
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
      raise errors.InputError("embed takes a string or a non-empty list of strings.")
    ids = self.tokenize(texts)
    rows = []
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      length = min(bucket(max(map(len, chunk))),
                   self.config.max_position_embeddings)
      tokens = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for row, i in enumerate(chunk):
        tokens[row, :len(i)] = i
        mask[row, :len(i)] = 1
      hidden, _, _ = encode(self.config, params, jnp.asarray(tokens),
                            jnp.asarray(mask))
      rows.append(np.asarray(mean_pool(hidden, jnp.asarray(mask)))[:len(chunk)])
    embeddings = np.concatenate(rows)
    return embeddings[0] if single else embeddings
