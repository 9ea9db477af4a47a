"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual
model (Mitchell et al., ICML 2022, "Memory-Based Model Editing at Scale").

The base model is never changed. An edit is stored as text in an explicit
memory (its *statement*: "The Eiffel Tower is located in Rome"). For every
input a scope classifier (`keditjax.training.scope`: frozen all-MiniLM-L6-v2
sentence embeddings, a learned projection and a learned scale on their
cosine) picks the memory entry most likely to be in scope; if its
probability exceeds `threshold` the input goes to the counterfactual model
with that edit, otherwise to the base model (§3).

The counterfactual model here is the base model itself, prompted with the
retrieved edit (`template`, default "Imagine that {edit}. Imagine that
{edit}. {prompt}"); the paper trains a separate small seq2seq/LM on (edit,
input, answer) triples. In-context conditioning and the template were chosen
by measurement on CounterFact training records
(`experiments/serac_templates.py`, docs/results/serac_templates.json): a
135M model told the edit once ("{edit}. {prompt}") prefers the new target on
only ~70% of edit prompts; framed as a counterfactual and said twice, on
~95% of edit prompts and paraphrases. The price is paid only when routing
errs: a neighbour wrongly routed to an edit keeps its true answer less often
with the stronger template.

Because SERAC routes whole inputs, not activations, `apply` returns a
`SeracModel` (a `keditjax.models.routed.Routed`) in place of params: scoring,
`LanguageModel.score` and `LanguageModel.generate` route through it, so the
evaluation harness treats SERAC like every other editor.

Removal is exact: an entry is deactivated and retrieval never considers it,
so every input is answered as if the edit had never been made.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base
from keditjax.models import routed
from keditjax.training import scope

KIND = "serac"
SITE = "serac/memory"
ASSET = os.path.join(os.path.dirname(__file__), "assets",
                     "serac_scope_minilm.npz")


@dataclasses.dataclass(frozen=True)
class SeracHParams:
  """SERAC hyper-parameters.

  Attributes:
    classifier: a scope classifier `.npz` (`keditjax.training.scope.save`);
      "" is the one shipped with the package, trained on the CounterFact
      and zsRE training splits by `experiments/train_scope.py`.
    encoder: the sentence encoder the classifier was trained on (a
      `keditjax.models.load` name).
    threshold: the in-scope probability above which an input is routed to
      the counterfactual model.
    template: how the counterfactual model sees an in-scope input:
      `template.format(edit=<statement>, prompt=<input>)`.
  """
  classifier: str = ""
  encoder: str = "all-minilm-l6-v2"
  threshold: float = 0.5
  template: str = ("Imagine that {edit}. Imagine that {edit}. "
                   "{prompt}")

  def __post_init__(self):
    if not 0.0 < self.threshold < 1.0:
      raise errors.ConfigError(
          f"SERAC threshold={self.threshold} must lie in (0, 1) (an "
          "in-scope probability).")
    if "{edit}" not in self.template or "{prompt}" not in self.template:
      raise errors.ConfigError(
          f"SERAC template={self.template!r} must contain {{edit}} and "
          "{prompt}.")
    if self.classifier and not os.path.exists(self.classifier):
      raise errors.ConfigError(
          f"SERAC classifier={self.classifier!r} does not exist.")


@functools.lru_cache(maxsize=2)
def _encoder(name: str):
  from keditjax import models  # pylint: disable=import-outside-toplevel
  return models.load(name)


def embed(name: str, texts) -> np.ndarray:
  """Unit sentence embeddings `[N, E]` of `texts` by encoder `name`."""
  encoder = _encoder(name)
  return encoder.embed(encoder.params, list(texts), batch_size=64)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeracModel(routed.Routed):
  """The base params plus SERAC's memory and classifier.

  Attributes:
    base: the base model's parameter pytree (never changed).
    classifier: the scope classifier's params.
    memory: `[C, E]` sentence embeddings of the edit statements.
    active: `[C]` 1 for live entries, 0 for removed ones.
    texts: the edit statements (static).
    threshold, template, encoder: from the hyper-parameters (static).
  """
  base: Any
  classifier: dict
  memory: Any
  active: Any
  texts: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  threshold: float = dataclasses.field(default=0.5,
                                       metadata=dict(static=True))
  template: str = dataclasses.field(default=SeracHParams.template,
                                    metadata=dict(static=True))
  encoder: str = dataclasses.field(default="all-minilm-l6-v2",
                                   metadata=dict(static=True))

  def retrieve(self, prompts) -> np.ndarray:
    """The memory entry each prompt is routed to, -1 for the base model."""
    if not self.texts:
      return np.full((len(prompts),), -1, np.int64)
    return scope.retrieve(self.classifier, embed(self.encoder, prompts),
                          self.memory, self.threshold, self.active)

  def route(self, model, prompts):
    del model
    prompts = list(prompts)
    if not prompts:
      return prompts
    return [p if i < 0 else self.template.format(edit=self.texts[i], prompt=p)
            for p, i in zip(prompts, self.retrieve(prompts))]

  def size(self) -> int:
    return int(np.sum(np.asarray(self.active)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeracState:
  """The classifier (arrays) and the edit count."""
  num_edits: jax.Array
  classifier: dict


def _check_request(request):
  if not request.text.strip() or not request.target_new.strip():
    raise errors.InputError(
        f"request {request.case_id!r}: empty prompt or target.")


def serac(hparams: SeracHParams = SeracHParams()):
  """The SERAC editor (module docstring)."""

  def init(model, params=None, *, classifier=None):
    """Loads the scope classifier (`classifier` params, else
    `hparams.classifier`, else the shipped one).

    Raises:
      ConfigError: an encoder model, or a classifier of another width.
      CheckpointError: an unreadable classifier file.
    """
    del params
    if not model.config.is_decoder:
      raise errors.ConfigError("SERAC edits decoder language models.")
    if classifier is None:
      classifier = scope.load(hparams.classifier or ASSET)
    classifier = {k: jnp.asarray(v, jnp.float32)
                  for k, v in dict(classifier).items()}
    width = _encoder(hparams.encoder).config.hidden_size
    if classifier["proj"].shape[0] != width:
      raise errors.ConfigError(
          f"the scope classifier takes {classifier['proj'].shape[0]}-d "
          f"embeddings; encoder {hparams.encoder} gives {width}.")
    return SeracState(num_edits=jnp.zeros((), jnp.int32),
                      classifier=classifier)

  def apply(model, params, requests, state: SeracState):
    """Adds each request's statement to the memory (no optimisation)."""
    requests = base.make_requests(requests)
    for r in requests:  # validate before work
      _check_request(r)
      base.encode_request(model, r, "SERAC")  # fits the base model's context
    timer = base.Timer()
    if isinstance(params, SeracModel):
      for field in ("threshold", "template", "encoder"):
        if getattr(params, field) != getattr(hparams, field):
          raise errors.ConfigError(
              f"the SERAC memory uses {field}={getattr(params, field)!r}, "
              f"not {getattr(hparams, field)!r}.")
      current = params
    else:
      dim = state.classifier["proj"].shape[0]
      current = SeracModel(base=params, classifier=state.classifier,
                           memory=np.zeros((0, dim), np.float32),
                           active=np.zeros((0,), np.int32), texts=(),
                           threshold=hparams.threshold,
                           template=hparams.template, encoder=hparams.encoder)
    statements = [scope.statement(r) for r in requests]
    with timer("embed"):
      new = embed(hparams.encoder, statements)
    start = len(current.texts)
    edited = dataclasses.replace(
        current, classifier=state.classifier,
        memory=np.concatenate([np.asarray(current.memory), new]),
        active=np.concatenate([np.asarray(current.active),
                               np.ones(len(new), np.int32)]),
        texts=current.texts + tuple(statements))
    records = [base.EditRecord(
        id=uuid.uuid4().hex, method=KIND, request=r,
        touched=(base.AdapterEntry(SITE, KIND, start + i, "add", None),))
               for i, r in enumerate(requests)]
    info = base.EditInfo(changed={}, seconds=timer.seconds,
                         extras={"memory_size": edited.size()},
                         records=records)
    return edited, SeracState(num_edits=state.num_edits + len(requests),
                              classifier=state.classifier), info

  return base.FunctionalEditor(KIND, hparams, init, apply)


def remove(params: SeracModel, hparams: SeracHParams, records) -> SeracModel:
  """`params` without the edits of `records` (exact: deactivated entries are
  never retrieved). `params` is left untouched."""
  del hparams
  if not isinstance(params, SeracModel):
    raise errors.InputError("remove needs the SeracModel that apply returned.")
  if isinstance(records, base.EditRecord):
    records = [records]
  active = np.asarray(params.active).copy()
  for record in records:
    for entry in record.touched:
      if not isinstance(entry, base.AdapterEntry) or entry.kind != KIND:
        continue
      if entry.index >= len(active):
        raise errors.InputError(
            f"record {record.id} names memory entry {entry.index}; the "
            f"memory has {len(active)}.")
      active[entry.index] = 0
  return dataclasses.replace(params, active=active)


__all__ = ["SeracHParams", "SeracModel", "SeracState", "embed", "remove",
           "serac"]
