"""A random tiny Llama with a byte-level tokenizer: tests, demos, notebooks.

Nothing is downloaded; the weights are a seeded random init, so what a
hypernetwork learns on it is the editing mechanics, not world knowledge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer as HFTokenizer, decoders, models as tk_models
from tokenizers import pre_tokenizers

from keditjax.models import registry
from keditjax.models.config import ModelConfig
from keditjax.models.lm import LanguageModel
from keditjax.models.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
  """256 byte tokens + BOS (256) / EOS (257), no merges."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab["<s>"], vocab["</s>"] = 256, 257
  hf = HFTokenizer(tk_models.BPE(vocab=vocab, merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  return Tokenizer.from_json(hf.to_str(), bos_id=256, eos_id=257)


def tiny_lm(num_layers: int = 4, seed: int = 0, arch: str = "llama",
            hidden_size: int = 64, intermediate_size: int = 128,
            embed_std: float | None = None) -> LanguageModel:
  """A random tiny decoder (`arch` "llama" or "gpt2") named "tiny".

  `embed_std` rescales the (tied) embeddings: the default init (std 0.02)
  makes every next-token distribution nearly uniform, so no weight change
  can make a target likely; std 1 gives a model whose predictions can move.
  """
  config = ModelConfig(arch=arch, vocab_size=258, hidden_size=hidden_size,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2,
                       head_dim=hidden_size // 4,
                       intermediate_size=intermediate_size,
                       max_position_embeddings=256, norm_eps=1e-5,
                       activation="silu" if arch == "llama" else "gelu_new",
                       rope_theta=10000.0, tie_word_embeddings=True,
                       hf_model_type=arch, bos_token_id=256, eos_token_id=257)
  module = registry.get_arch(arch).module(config)
  params = module.init(jax.random.key(seed),
                       jnp.zeros((1, 8), jnp.int32))["params"]
  if embed_std is not None:  # the (tied) token embedding table, rescaled
    outer, inner = registry.get_arch(arch).site_params["embed"]
    table = params[outer][inner]
    params = dict(params, **{outer: dict(
        params[outer], **{inner: table * (embed_std / jnp.std(table))})})
  return LanguageModel(config, params, byte_tokenizer(), name="tiny")
