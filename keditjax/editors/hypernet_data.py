"""Token rows for hypernetwork editors (MEND) and their training data.

A *row set* is a dict of numpy arrays for N `(prompt, target)` pairs:

  tokens, mask  [N, L]   prompt + target, left-aligned, zero-padded
  pos           [N, P]   where each target token is predicted (prompt_len-1+j)
  tgt, w        [N, P]   the target ids and 1/0 weights (P >= target length)

Training examples are tuples `(edit, paraphrase, locality_1, ...,
locality_k)` of pairs: the edit and a paraphrase of it carry the new
target, each locality pair an unrelated prompt with the answer the
unedited model should keep.
"""

from __future__ import annotations

import numpy as np
from keditjax import progress as progress_lib

import jax

from keditjax import errors
from keditjax.editors.tasks import rows_bucket
from keditjax.models import lm


def encode_pair(model, prompt: str, target: str):
  """Prompt and target token ids (the target with one leading space)."""
  target = target if target.startswith(" ") else " " + target
  p, t = model.encode(prompt), model.encode(target)
  if not p or not t:
    raise errors.InputError(
        f"({prompt!r}, {target!r}) encodes to no prompt or target tokens.")
  return p, t


def rows(model, pairs, *, length: int | None = None,
         targets: int | None = None, pad_rows: bool = False) -> dict:
  """The row set of `pairs` (module docstring).

  Args:
    model: a `LanguageModel` (its tokenizer).
    pairs: `(prompt, target)` strings.
    length, targets: L and P (default: bucketed to the longest).
    pad_rows: pad N to a power of two with zero-weight rows.

  Raises:
    InputError: an empty pair, or one longer than `length` / `targets` or
      than the model's context.
  """
  encoded = [encode_pair(model, p, t) for p, t in pairs]
  if not encoded:
    raise errors.InputError("no (prompt, target) pairs given.")
  need_l = max(len(p) + len(t) for p, t in encoded)
  limit = model.config.max_position_embeddings
  if need_l > limit:
    raise errors.InputError(
        f"a (prompt, target) pair is {need_l} tokens; the model takes "
        f"{limit} (max_position_embeddings).")
  need_p = max(len(t) for _, t in encoded)
  length = length or lm.bucket(need_l)
  targets = targets or lm.bucket(need_p, 4)
  if need_l > length or need_p > targets:
    raise errors.InputError(
        f"a pair needs {need_l} tokens / {need_p} target tokens; the rows "
        f"hold {length} / {targets}.")
  n = rows_bucket(len(encoded)) if pad_rows else len(encoded)
  out = {"tokens": np.zeros((n, length), np.int32),
         "mask": np.zeros((n, length), np.int32),
         "pos": np.zeros((n, targets), np.int32),
         "tgt": np.zeros((n, targets), np.int32),
         "w": np.zeros((n, targets), np.float32)}
  for i, (p, t) in enumerate(encoded):
    ids = p + t
    out["tokens"][i, :len(ids)] = ids
    out["mask"][i, :len(ids)] = 1
    out["pos"][i, :len(t)] = np.arange(len(p) - 1, len(ids) - 1)
    out["tgt"][i, :len(t)] = t
    out["w"][i, :len(t)] = 1.0
  out["mask"][:, 0] = 1  # padding rows attend to one token instead of none
  return out


def fits(model, pair, length: int, targets: int) -> bool:
  p, t = encode_pair(model, *pair)
  return len(p) + len(t) <= length and len(t) <= targets


def triples_from_cases(cases) -> list[tuple]:
  """`(edit, paraphrase, locality, ...)` examples from evaluation `EditCase`s:
  the new target on the prompt and its first paraphrase, then every
  neighbourhood pair. Cases without a paraphrase or a neighbourhood prompt
  are skipped; `with_locality` picks how many locality pairs are used.
  """
  out = []
  for case in cases:
    if not case.paraphrase_prompts or not case.neighborhood:
      continue
    target = case.target_new
    out.append(((case.prompt, target), (case.paraphrase_prompts[0], target),
                *(tuple(pair) for pair in case.neighborhood)))
  return out


def with_locality(examples, k: int) -> list[tuple]:
  """Each example as `(edit, paraphrase, loc_1, ..., loc_k)`: its first `k`
  locality pairs, cycled when it has fewer (so every edit gets k)."""
  if k < 1:
    raise errors.ConfigError(f"loc_per_edit={k} must be >= 1.")
  out = []
  for example in examples:
    locs = example[2:]
    out.append(tuple(example[:2]) + tuple(locs[i % len(locs)]
                                          for i in range(k)))
  return out


_SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "ta", "no", "vi", "sa", "po")
_RELATIONS = (
    ("{} lives in", "The home town of {} is", ("Paris", "Rome", "Oslo",
                                               "Lima", "Cairo", "Kyiv")),
    ("{} speaks", "The language of {} is", ("French", "Greek", "Hindi",
                                            "Czech", "Thai", "Malay")),
    ("{} plays the", "The instrument of {} is the", ("piano", "harp", "drum",
                                                     "flute", "oboe", "lute")),
)


def synthetic_triples(n: int, seed: int = 0) -> list[tuple]:
  """`n` triples of an invented world (for tests, demos and the notebook).

  Subjects are random names; each edit asserts a random object for one of
  three relations, the paraphrase uses the relation's other template, and
  the locality prompt asks about another subject.
  """
  rng = np.random.RandomState(seed)
  name = lambda: "".join(rng.choice(_SYLLABLES, 3)).capitalize()
  out = []
  for _ in range(n):
    template, para, objects = _RELATIONS[rng.randint(len(_RELATIONS))]
    subject, other = name(), name()
    target = objects[rng.randint(len(objects))]
    out.append(((template.format(subject), target),
                (para.format(subject), target),
                (template.format(other), objects[rng.randint(len(objects))])))
  return out


def prefix_hidden(model, params, row_set: dict, start_layer: int, *,
                  batch_size: int = 16, progress: bool = True) -> np.ndarray:
  """The residual stream entering block `start_layer`, `[N, L, D]` float32.

  Blocks below the first edited layer never change during hypernetwork
  training, so this is computed once per example.
  """
  config = model.config
  run = jax.jit(lambda p, t, m: lm.run(config, p, t, attention_mask=m,
                                       stop_layer=start_layer)[0])
  n = len(row_set["tokens"])
  out = np.zeros((n, row_set["tokens"].shape[1], config.hidden_size),
                 np.float32)
  for start in progress_lib.bar(range(0, n, batch_size), desc="prefix activations",
                    disable=not progress):
    stop = min(start + batch_size, n)
    tokens = np.zeros((batch_size,) + row_set["tokens"].shape[1:], np.int32)
    mask = np.ones_like(tokens)
    tokens[:stop - start] = row_set["tokens"][start:stop]
    mask[:stop - start] = row_set["mask"][start:stop]
    out[start:stop] = np.asarray(run(params, tokens, mask), np.float32)[
        :stop - start]
  return out


__all__ = ["encode_pair", "fits", "prefix_hidden", "rows",
           "synthetic_triples", "triples_from_cases", "with_locality"]
