"""Routed params: an edited model that decides per *input*, not per activation.

Most editors return a parameter pytree: weights (ROME, MEMIT, ...) or
adapters at sites (GRACE, T-Patcher, WISE), and every forward path sees them.
Some architectural editors instead route whole inputs: SERAC sends an input
that a scope classifier finds in the scope of an edit to a counterfactual
model conditioned on that edit, and every other input to the untouched base
model. Such an editor returns a `Routed` object in place of params:

  new_params, state, info = serac.apply(model, model.params, requests, state)
  scoring.teacher_forced(model, new_params, prompts, targets)   # routed
  model.generate(new_params, prompts)                          # routed

`Routed.route(model, prompts)` rewrites each prompt for the model that must
answer it (the counterfactual model here is the base model itself prompted
with the retrieved edit, so routing is a prompt rewrite over `base` params).
Scoring, `LanguageModel.score` and `LanguageModel.generate` call `resolve`,
so the evaluation harness, the launchers and user code treat every editor
alike. A `Routed` subclass is a registered pytree (its `base` params are
leaves), so `jax.block_until_ready` and the sequential protocol handle it
like params.
"""

from __future__ import annotations

from typing import Any, Sequence


class Routed:
  """An edited model that rewrites inputs before the base model sees them.

  Subclasses are `jax.tree_util.register_dataclass` dataclasses with a
  `base` field (the base model's parameter pytree) and implement `route`.
  """
  base: Any

  def route(self, model, prompts: Sequence[str]) -> list[str]:
    """The prompt the base params must answer, for each of `prompts`."""
    raise NotImplementedError


def resolve(model, params, prompts: Sequence):
  """`(params, prompts)` for the base model: unchanged for plain params,
  routed (`Routed.route`) for a `Routed` object.

  Args:
    model: the `LanguageModel`.
    params: a parameter pytree or a `Routed`.
    prompts: strings (a `Routed` needs text; token-id prompts are decoded).
  """
  if not isinstance(params, Routed):
    return params, list(prompts)
  texts = [p if isinstance(p, str) else model.tokenizer.decode(list(p))
           for p in prompts]
  return params.base, params.route(model, texts)


def is_routed(params) -> bool:
  return isinstance(params, Routed)


__all__ = ["Routed", "is_routed", "resolve"]
