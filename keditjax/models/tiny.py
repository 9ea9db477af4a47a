"""A random tiny Llama with a byte-level tokenizer: tests, demos, notebooks.

Nothing is downloaded; the weights are a seeded random init, so what a
hypernetwork learns on it is the editing mechanics, not world knowledge.

`fact_lm` is the same tiny model trained for a few seconds to know 48
synthetic facts ("A lives in Oslo."). A random model knows nothing, so a
rank-one edit there is not specific (raising one subject's target raises
every subject's); in the trained one each subject's key selects its own
fact, as in a real model, so successive-edit behaviour (an edit's prompt,
the other edits, a rollback) can be measured at test scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer as HFTokenizer, decoders, models as tk_models
from tokenizers import pre_tokenizers

from keditjax.models import registry
from keditjax.models.config import ModelConfig
from keditjax.models import lm
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


FACT_CITIES = ("Rome", "Paris", "Oslo", "Lima", "Kyiv", "Baku", "Tunis",
               "Hanoi", "Dakar", "Quito")
FACT_SUBJECTS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuv")
FACT_PROMPT = "{} lives in"


def facts(seed: int = 0) -> dict:
  """subject -> its city: what `fact_lm(seed)` is trained to know."""
  rng = np.random.default_rng(seed)
  return {s: FACT_CITIES[rng.integers(len(FACT_CITIES))]
          for s in FACT_SUBJECTS}


def fact_sentence(subject: str, city: str) -> str:
  return FACT_PROMPT.format(subject) + f" {city}."


def fact_corpus() -> list[str]:
  """Every subject (and 14 unused bytes) with every city: the fact model's
  world, e.g. for a key covariance (`keditjax.stats`)."""
  return [fact_sentence(s, c) for s in FACT_SUBJECTS + tuple("wxyz0123456789")
          for c in FACT_CITIES]


def fact_lm(seed: int = 0, steps: int = 400) -> tuple[LanguageModel, dict]:
  """A 4-layer tiny Llama (64 wide, MLP 256) trained to know `facts(seed)`.

  Full-batch Adam (lr 3e-3) on the 48 sentences for `steps` steps from the
  seeded random init: ~15 s on 2 CPU cores, after which it ranks the right
  city first for every subject.

  Returns:
    (model named "tiny-facts", facts(seed)).
  """
  known = facts(seed)
  model = tiny_lm(num_layers=4, embed_std=1.0, intermediate_size=256)
  rows = [model.encode(fact_sentence(s, c)) for s, c in known.items()]
  tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
  mask = np.zeros_like(tokens)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  config, opt = model.config, optax.adam(3e-3)

  def loss(params):
    logits, _ = lm.forward(config, params, tokens, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    tok = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return -jnp.sum(tok * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = model.params, opt.init(model.params)
  for _ in range(steps):
    params, state = step(params, state)
  return LanguageModel(config, params, model.tokenizer,
                       name="tiny-facts"), known


def fact_requests(known: dict, subjects, shift: int = 3) -> list[dict]:
  """Requests moving each subject to the city `shift` places after its own
  (target_true is its own city)."""
  def moved(city):
    return FACT_CITIES[(FACT_CITIES.index(city) + shift) % len(FACT_CITIES)]
  return [{"prompt": FACT_PROMPT, "subject": s, "target_new": " " +
           moved(known[s]), "target_true": " " + known[s]} for s in subjects]
