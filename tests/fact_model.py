"""A tiny model trained for a few seconds to know synthetic facts.

The random tiny model (`keditjax.models.tiny`) knows nothing, so a rank-one
edit there is not specific: raising one subject's target raises every
subject's. This one is trained (full-batch Adam) on "{X} lives in {city}."
for one-byte subjects X, so each subject's key selects its own fact, as in
a real model, and the successive-edit behaviour the rollback acceptance
talks about ("the edit's prompt returns, the other edits hold") can be
measured on a model small enough for the suite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax.models import lm, tiny

CITIES = ("Rome", "Paris", "Oslo", "Lima", "Kyiv", "Baku", "Tunis", "Hanoi",
          "Dakar", "Quito")
SUBJECTS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuv")
PROMPT = "{} lives in"


def facts(seed: int = 0) -> dict:
  """subject -> its (true) city."""
  rng = np.random.default_rng(seed)
  return {s: CITIES[rng.integers(len(CITIES))] for s in SUBJECTS}


def sentence(subject: str, city: str) -> str:
  return PROMPT.format(subject) + f" {city}."


def corpus_lines() -> list[str]:
  """Every subject (and the 14 unused bytes) with every city: the text the
  key covariance is taken over."""
  chars = SUBJECTS + tuple("wxyz0123456789")
  return [sentence(s, c) for s in chars for c in CITIES]


def train(seed: int = 0, steps: int = 400, intermediate_size: int = 256,
          hidden_size: int = 64):
  """(model, facts): a 4-layer tiny Llama that knows `facts(seed)`."""
  known = facts(seed)
  model = tiny.tiny_lm(num_layers=4, embed_std=1.0, hidden_size=hidden_size,
                       intermediate_size=intermediate_size)
  ids = [model.encode(sentence(s, c)) for s, c in known.items()]
  tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
  mask = np.zeros_like(tokens)
  for i, row in enumerate(ids):
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
    grad = jax.grad(loss)(params)
    updates, state = opt.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  params, state = model.params, opt.init(model.params)
  for _ in range(steps):
    params, state = step(params, state)
  return lm.LanguageModel(config, params, model.tokenizer,
                          name="tiny-facts"), known


def city_scores(model, params, subjects) -> np.ndarray:
  """log P(" city" | prompt) `[len(subjects), len(CITIES)]`."""
  prompts = [PROMPT.format(s) for s in subjects]
  return np.stack([model.score(params, prompts, [" " + c] * len(prompts))
                   for c in CITIES], 1)
