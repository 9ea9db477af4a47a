"""Causal tracing (ROME §2, Meng et al. 2022): where a model recalls a fact.

Three runs of the prompt: the clean run; the corrupted run, where Gaussian
noise is added to the subject's token embeddings (`embed` site, one noise draw
per sample row); and the corrupted-with-restoration run, where one hidden state
at (token t, layer l) is set back to its clean value and everything else flows
from the corruption. The restored probability of the model's own answer minus
the corrupted one is the state's indirect effect (ROME §2.1):

  IE(t, l) = P*_{clean h_t^l}[answer] - P*[answer].

States are the residual stream (`layer/{l}/resid`, one layer restored), the
MLP output (`layer/{l}/mlp/value`) and the attention output
(`layer/{l}/attn/out`); MLP and attention restore a window of layers around
`l`, as in ROME's Figure 1.

All restorations of a prompt run as rows of a batch: a row is (kind, token t,
restored layers [a, b), noise sample). Such a row agrees with the corrupted run
below block `a` and, attention being causal, at every position before t. So it
starts at block `a` from the corrupted residual stream and computes only the
positions from t, attending to the corrupted run's cached keys and values
before t. That is exact, and does a quarter to a third of the block work of
full forward passes over 16-padded prompts (SmolLM2, 6-12 token prompts).
Every block has the same parameter shapes, so one compiled block function
serves all layers (the layer is a traced index); prompts and spans are padded
to length buckets, so nothing recompiles from prompt to prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.models import layers, lm, registry
from keditjax.models import sites as sites_lib

# Trace kind -> the site whose state is restored.
KINDS = {"resid": "resid", "mlp": "mlp/value", "attn": "attn/out"}
# ROME's token groups for the average over prompts (its Figure 2).
GROUPS = ("first subject token", "middle subject tokens", "last subject token",
          "first subsequent token", "further tokens", "last token")


@dataclasses.dataclass(frozen=True)
class Trace:
  """The causal trace of one prompt.

  Attributes:
    prompt, subject: the inputs.
    token_ids, tokens: the prompt's token ids and their decoded strings.
    subject_range: `(start, stop)` token positions of the subject.
    answer_id, answer: the model's greedy next token on the clean prompt.
    high_score: clean `p(answer)`.
    low_score: corrupted `p(answer)` (mean over noise samples).
    scores: kind -> float `[T, num_layers]`, `p(answer)` with state (t, l)
      restored (mean over noise samples); for windowed kinds `l` is the
      window's centre.
    noise, samples, window: the settings used.
  """
  prompt: str
  subject: str
  token_ids: tuple[int, ...]
  tokens: tuple[str, ...]
  subject_range: tuple[int, int]
  answer_id: int
  answer: str
  high_score: float
  low_score: float
  scores: dict
  noise: float
  samples: int
  window: int

  def indirect_effect(self, kind: str) -> np.ndarray:
    """`[T, num_layers]` restored minus corrupted `p(answer)` (ROME §2.1)."""
    return self.scores[kind] - self.low_score

  def to_json(self) -> dict:
    """A JSON-serialisable dict with every field."""
    out = dataclasses.asdict(self)
    out["scores"] = {k: v.tolist() for k, v in self.scores.items()}
    return out


def subject_range(tokenizer, token_ids: Sequence[int],
                  subject: str) -> tuple[int, int]:
  """Token positions `[start, stop)` covering the first occurrence of `subject`.

  Like ROME's `find_token_range`, but measured on decoded prefixes so that a
  character split across tokens cannot shift the offsets.

  Raises:
    InputError: the subject is empty or not in the decoded prompt.
  """
  text = tokenizer.decode(list(token_ids))
  first_char = text.find(subject) if subject else -1
  if first_char < 0:
    raise errors.InputError(
        f"subject {subject!r} does not occur in the prompt {text!r}.")
  stop_char = first_char + len(subject)
  ends = [len(tokenizer.decode(list(token_ids[:i + 1])))
          for i in range(len(token_ids))]
  start = next(i for i, end in enumerate(ends) if end > first_char)
  stop = next(i for i, end in enumerate(ends) if end >= stop_char) + 1
  return start, stop


def embedding_std(model, subjects: Sequence[str], params=None) -> float:
  """Standard deviation of the subjects' token embeddings (all entries).

  ROME (§2.1, `collect_embedding_std`) sets the corruption noise to three
  times this value.
  """
  params = model.params if params is None else params
  table = params
  for part in registry.site_param_path(model.config, "embed"):
    table = table[part]
  ids = [i for s in subjects for i in model.encode(s)]
  if not ids:
    raise errors.InputError("embedding_std needs at least one non-empty subject.")
  return float(jnp.std(jnp.asarray(table)[jnp.asarray(ids)]))


def corruption_noise(seed: int, samples: int, num_tokens: int, dim: int,
                     scale: float) -> np.ndarray:
  """The noise added to the subject embeddings: float32 `[S, P, D]`.

  Drawn with numpy from `seed` (ROME uses `RandomState(1)`), the same draw for
  every restoration of a prompt so that restorations are compared on equal
  corruptions.
  """
  rng = np.random.RandomState(seed)
  return (scale * rng.randn(samples, num_tokens, dim)).astype(np.float32)


def _block_name(config) -> str:
  """The parameter key of block `{l}` ("layers_{l}" for Llama, "h_{l}" GPT)."""
  return registry.get_arch(config.arch).site_params["attn/out"][0]


def _run_block(config, block_params, hidden_BxTxD, **kwargs):
  """Runs one block (given its parameters) as block 0 of the model.

  A model whose only layer is block 0 would end in the head, so the config
  keeps at least two layers; only block 0's parameters are read.
  """
  one_block = config if config.num_layers > 1 else config.replace(num_layers=2)
  return lm.run(one_block, {_block_name(config).format(l=0): block_params},
                hidden=hidden_BxTxD, stop_layer=1, **kwargs)


@functools.partial(jax.jit, static_argnames=("config",))
def _clean_and_corrupted(config, params, tokens_1xL, mask_1xL, noise_RxLxD,
                         last):
  """Row 0 clean, rows 1.. corrupted: next-token probs and the saved states.

  Returns:
    probs `[R, V]` at position `last`; clean states kind -> `[N, L, D]`; the
    corrupted residual stream entering each block, `[S, N, L, D]`.
  """
  rows = noise_RxLxD.shape[0]
  num_layers = config.num_layers
  names = ("embed",) + tuple(f"layer/{l}/{site}" for site in KINDS.values()
                             for l in range(num_layers))
  sites = sites_lib.Sites(
      patches={"embed": sites_lib.Patch(noise_RxLxD, mode="add")},
      capture=names)
  logits, out, _ = lm.run(
      config, params, jnp.broadcast_to(tokens_1xL, (rows,) + tokens_1xL.shape[1:]),
      attention_mask=jnp.broadcast_to(mask_1xL, (rows,) + mask_1xL.shape[1:]),
      logit_positions=jnp.full((rows, 1), last), sites=sites)
  clean = {site: jnp.stack([out[f"layer/{l}/{site}"][0]
                            for l in range(num_layers)])
           for site in KINDS.values()}
  entering = [out["embed"][1:]] + [out[f"layer/{l}/resid"][1:]
                                   for l in range(num_layers - 1)]
  return jax.nn.softmax(logits[:, 0]), clean, jnp.stack(entering, axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def _corrupted_keys_values(config, block_params, hidden_SxLxD, mask_1xL):
  """One block's key/value cache over the corrupted run: `(k, v, pos)`."""
  samples, length, _ = hidden_SxLxD.shape
  cache = layers.init_cache(config.replace(num_layers=1), samples, length)
  _, _, cache = _run_block(
      config, block_params, hidden_SxLxD, cache=cache,
      attention_mask=jnp.broadcast_to(mask_1xL, (samples, length)))
  return cache["layers"][0]["k"], cache["layers"][0]["v"], cache["pos"]


@functools.partial(jax.jit, static_argnames=("config",))
def _restore_block(config, block_params, keys_values, hidden_BxTxD, layer,
                   rows, clean, corrupted_SxNxLxD):
  """Runs block `layer` for a chunk of rows, restoring their clean states.

  A row restoring token t agrees with the corrupted run before position t
  (attention is causal), so it computes only the span of positions from t,
  attending to the corrupted run's cached keys and values before t. Rows
  whose window starts at `layer` first take the corrupted residual stream of
  their noise sample. A row restores kind k's site at span position 0 while
  `start <= layer < stop`; other rows write into the span's last position,
  which lies past the prompt where no real token attends, so one `replace`
  patch per site serves the whole chunk.
  """
  batch, span, dim = hidden_BxTxD.shape
  keys_SxLxGxK, values_SxLxGxK, key_pos_SxL = keys_values
  length = key_pos_SxL.shape[1]
  token_B, sample_B = rows["token"], rows["sample"]
  positions_BxT = token_B[:, None] + jnp.arange(span)
  entering_BxTxD = jnp.take_along_axis(
      corrupted_SxNxLxD[sample_B, layer],
      jnp.minimum(positions_BxT, length - 1)[..., None], axis=1)
  hidden_BxTxD = jnp.where((rows["start"] == layer)[:, None, None],
                           entering_BxTxD, hidden_BxTxD)
  active_B = (rows["start"] <= layer) & (layer < rows["stop"])
  patches = {}
  for k, site in enumerate(KINDS.values()):
    restore_B = active_B & (rows["kind"] == k)
    patches[f"layer/0/{site}"] = sites_lib.Patch(
        clean[site][layer][token_B][:, None],
        jnp.where(restore_B, 0, span - 1)[:, None], mode="replace")
  # The span's keys and values go after the corrupted prefix (from slot
  # `length`); masks are decided on key positions, so slot order is free, and
  # prefix slots from t on are marked empty (-1).
  empty_BxTxGxK = jnp.zeros((batch, span) + keys_SxLxGxK.shape[2:],
                            keys_SxLxGxK.dtype)
  with_span = lambda prefix_SxLxGxK: jnp.concatenate(
      [prefix_SxLxGxK[sample_B], empty_BxTxGxK], axis=1)
  prefix_pos_BxL = jnp.where(jnp.arange(length) < token_B[:, None],
                             key_pos_SxL[sample_B], -1)
  cache = {"layers": [{"k": with_span(keys_SxLxGxK),
                       "v": with_span(values_SxLxGxK)}],
           "pos": jnp.concatenate([prefix_pos_BxL, jnp.full(
               (batch, span), -1, jnp.int32)], axis=1),
           "index": jnp.asarray(length, jnp.int32)}
  hidden_BxTxD, _, _ = _run_block(config, block_params, hidden_BxTxD,
                                  positions=positions_BxT, cache=cache,
                                  sites=sites_lib.Sites(patches=patches))
  return hidden_BxTxD


@functools.partial(jax.jit, static_argnames=("config",))
def _answer_probs(config, params, hidden_BxTxD, last_B, answer):
  """`p(answer)` at span position `last_B` from the final residual stream."""
  logits, _, _ = lm.run(config, params, hidden=hidden_BxTxD,
                        start_layer=config.num_layers,
                        logit_positions=last_B[:, None])
  return jax.nn.softmax(logits[:, 0])[:, answer]


def _check(model, prompt, subject, kinds, samples, window, noise):
  """Validates inputs before any work; returns token ids and subject range."""
  if not isinstance(prompt, str) or not prompt:
    raise errors.InputError(f"prompt must be a non-empty string, got {prompt!r}.")
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds:
    raise errors.InputError(f"kinds={kinds!r}: choose from {tuple(KINDS)}.")
  if samples < 1 or window < 1:
    raise errors.InputError(
        f"samples={samples} and window={window} must both be >= 1.")
  if not (np.isfinite(noise) and noise >= 0):
    raise errors.InputError(f"noise={noise} must be finite and >= 0.")
  token_ids = model.encode(prompt)
  if not token_ids:
    raise errors.InputError(f"prompt {prompt!r} has no tokens.")
  if len(token_ids) > model.config.max_position_embeddings:
    raise errors.InputError(
        f"prompt has {len(token_ids)} tokens, more than "
        f"max_position_embeddings={model.config.max_position_embeddings}.")
  return token_ids, subject_range(model.tokenizer, token_ids, subject)


def _rows(kinds, first, num_tokens, num_layers, samples, window) -> dict:
  """One restoration per (kind, token, centre layer, sample), in that order.

  Returns:
    int32 arrays: `kind` (index into `KINDS`), `token`, `sample`, and the
    restored layers `[start, stop)`: the centre alone for "resid", ROME's
    window `[centre - window // 2, centre + ceil(window / 2))` otherwise.
  """
  kind, token, centre, sample = (a.ravel() for a in np.meshgrid(
      [list(KINDS).index(k) for k in kinds], np.arange(first, num_tokens),
      np.arange(num_layers), np.arange(samples), indexing="ij"))
  windowed = kind != list(KINDS).index("resid")
  start = np.where(windowed, np.maximum(0, centre - window // 2), centre)
  stop = np.where(windowed,
                  np.minimum(num_layers, centre + window - window // 2),
                  centre + 1)
  return {name: a.astype(np.int32) for name, a in (
      ("kind", kind), ("token", token), ("sample", sample), ("start", start),
      ("stop", stop))}


def causal_trace(model, prompt: str, subject: str, *, noise: float,
                 samples: int = 10, window: int = 10,
                 kinds: Sequence[str] = tuple(KINDS), seed: int = 1,
                 params=None, chunk_size: int = 256, length_multiple: int = 4,
                 progress: bool = False) -> Trace:
  """Traces where `model` recalls the answer to `prompt` (ROME §2.1).

  Args:
    model: a `LanguageModel`.
    prompt: the prompt text; the answer is the model's greedy next token.
    subject: a substring of `prompt` whose embeddings are corrupted.
    noise: the corruption's standard deviation (ROME: 3 x `embedding_std`).
    samples: noise samples per restoration (ROME: 10).
    window: layers restored around each centre for "mlp" and "attn"
      (ROME: 10; layers `[l - window // 2, l + ceil(window / 2))`).
    kinds: which of "resid", "mlp", "attn" to trace.
    seed: the noise seed (`corruption_noise`).
    params: parameters to trace (default `model.params`).
    chunk_size: restoration rows per batch (bounds memory).
    length_multiple: prompts and restored spans are padded to a multiple of
      this (one compile per bucket, shared by all prompts).
    progress: show a tqdm bar over chunks.

  Returns:
    A `Trace`. Tokens before the subject never see the noise, so restoring
    them is a no-op; their scores are the corrupted probability.

  Raises:
    InputError: empty prompt, subject not in the prompt, bad settings.
  """
  kinds = tuple(kinds)
  token_ids, (first, stop) = _check(model, prompt, subject, kinds, samples,
                                    window, noise)
  config = model.config
  params = model.params if params is None else params
  num_tokens, num_layers, dim = len(token_ids), config.num_layers, config.hidden_size
  length = lm.bucket(num_tokens, length_multiple)
  tokens_1xL = np.zeros((1, length), np.int32)
  tokens_1xL[0, :num_tokens] = token_ids
  mask_1xL = (np.arange(length) < num_tokens).astype(np.int32)[None]
  noise_RxLxD = np.zeros((samples + 1, length, dim), np.float32)
  noise_RxLxD[1:, first:stop] = corruption_noise(seed, samples, stop - first,
                                                 dim, noise)
  last = num_tokens - 1
  probs_RxV, clean, corrupted = _clean_and_corrupted(
      config, params, tokens_1xL, mask_1xL, noise_RxLxD, last)
  probs_RxV = np.asarray(probs_RxV)
  answer = int(np.argmax(probs_RxV[0]))
  high, low = float(probs_RxV[0, answer]), float(probs_RxV[1:, answer].mean())

  block_name = _block_name(config)
  keys_values = [_corrupted_keys_values(
      config, params[block_name.format(l=layer)], corrupted[:, layer], mask_1xL)
                 for layer in range(num_layers)]
  rows = _rows(kinds, first, num_tokens, num_layers, samples, window)
  # A row restoring token t computes positions [t, t + span); the span
  # reaches past the prompt so its last slot can absorb no-op patches. Rows
  # with equal spans and similar start layers share a chunk.
  span_R = np.array([lm.bucket(num_tokens + 1 - t, length_multiple)
                     for t in range(num_tokens + 1)])[rows["token"]]
  order = np.lexsort((rows["start"], span_R))
  probs_R = np.zeros(order.size, np.float32)
  chunks = range(0, order.size, chunk_size)
  if progress:
    chunks = progress_lib.bar(chunks, desc="restorations", leave=False)
  for begin in chunks:
    picked = order[begin:begin + chunk_size]
    padded = np.resize(picked, chunk_size)  # repeat rows to a full chunk
    chunk = {name: jnp.asarray(a[padded]) for name, a in rows.items()}
    hidden = jnp.zeros((chunk_size, span_R[picked].max(), dim), jnp.float32)
    for layer in range(int(rows["start"][picked].min()), num_layers):
      hidden = _restore_block(config, params[block_name.format(l=layer)],
                              keys_values[layer], hidden, np.int32(layer),
                              chunk, clean, corrupted)
    probs = _answer_probs(config, params, hidden,
                          jnp.asarray(last - rows["token"][padded]), answer)
    probs_R[picked] = np.asarray(probs)[:picked.size]

  per_kind = probs_R.reshape(len(kinds), num_tokens - first, num_layers,
                             samples).mean(-1)
  scores = {}
  for k, kind in enumerate(kinds):
    scores[kind] = np.full((num_tokens, num_layers), low, np.float32)
    scores[kind][first:] = per_kind[k]
  decode = model.tokenizer.decode
  return Trace(prompt=prompt, subject=subject, token_ids=tuple(token_ids),
               tokens=tuple(decode([i]) for i in token_ids),
               subject_range=(first, stop), answer_id=answer,
               answer=decode([answer]), high_score=high, low_score=low,
               scores=scores, noise=float(noise), samples=samples,
               window=window)


def average_traces(traces: Sequence[Trace]) -> dict:
  """ROME's average over prompts (its Figure 2 and `average_causal_effects`).

  Each prompt's rows are pooled into six token groups (`GROUPS`): the first,
  middle and last subject tokens, the first subsequent token, further tokens
  and the last token; middle and further rows are pooled individually. A
  one-token subject counts as both first and last.

  Returns:
    A dict: `groups`, `count` `[6]`, `high_score`, `low_score` (means), and
    per kind `score` (mean `p(answer)`) and `effect` (mean indirect effect),
    each `[6, num_layers]` (NaN where a group is empty).
  """
  if not traces:
    raise errors.InputError("average_traces needs at least one trace.")
  kinds = tuple(traces[0].scores)
  num_layers = traces[0].scores[kinds[0]].shape[1]
  score_sum = {k: np.zeros((len(GROUPS), num_layers)) for k in kinds}
  effect_sum = {k: np.zeros((len(GROUPS), num_layers)) for k in kinds}
  count = np.zeros(len(GROUPS))
  for trace in traces:
    first, stop = trace.subject_range
    last = len(trace.tokens) - 1
    groups = ([first], range(first + 1, stop - 1), [stop - 1], [stop],
              range(stop + 1, last), [last])
    for g, positions in enumerate(groups):
      positions = [p for p in positions if p <= last]
      count[g] += len(positions)
      for kind in kinds:
        score_sum[kind][g] += trace.scores[kind][positions].sum(0)
        effect_sum[kind][g] += trace.indirect_effect(kind)[positions].sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_kind = {kind: {"score": score_sum[kind] / count[:, None],
                       "effect": effect_sum[kind] / count[:, None]}
                for kind in kinds}
  return {"groups": GROUPS, "count": count,
          "high_score": float(np.mean([t.high_score for t in traces])),
          "low_score": float(np.mean([t.low_score for t in traces])),
          **per_kind}


def peak_layers(average: dict, kind: str, group: str = "last subject token",
                top: int = 3) -> list[int]:
  """The `top` layers of largest average indirect effect for a token group.

  The MLP's peak at the last subject token is where ROME edits (its §2.3).
  """
  effect = average[kind]["effect"][GROUPS.index(group)]
  return [int(l) for l in np.argsort(-np.nan_to_num(effect, nan=-np.inf))[:top]]


def to_json(tree):
  """Arrays to nested lists and NaN to None, for `json.dump(allow_nan=False)`."""
  if isinstance(tree, dict):
    return {k: to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_json(v) for v in tree]
  if isinstance(tree, (np.ndarray, np.generic, float)):
    value = np.asarray(tree).tolist()
    return to_json(value) if isinstance(value, list) else (
        None if isinstance(value, float) and not np.isfinite(value) else value)
  return tree


_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"resid": "single restored layer", "mlp": "restored MLP window",
           "attn": "restored attention window"}


def _panel(fig, ax, values, labels, kind, title, vmin, colorbar):
  image = ax.pcolor(values, cmap=_CMAPS[kind], vmin=vmin)
  ax.invert_yaxis()
  ax.set_yticks(np.arange(len(labels)) + 0.5)
  ax.set_yticklabels(labels)
  ax.set_xticks(np.arange(0, values.shape[1], 5) + 0.5)
  ax.set_xticklabels(range(0, values.shape[1], 5))
  ax.set_xlabel(f"layer ({_TITLES[kind]})")
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax).ax.set_title(colorbar, fontsize=8)


def plot_trace(trace: Trace, path: str) -> None:
  """Writes a tokens x layers heatmap per kind (subject tokens marked '*')."""
  from matplotlib.figure import Figure  # no pyplot: leaves the backend alone
  first, stop = trace.subject_range
  labels = [repr(t)[1:-1] + ("*" if first <= i < stop else "")
            for i, t in enumerate(trace.tokens)]
  kinds = tuple(trace.scores)
  fig = Figure(figsize=(4.6 * len(kinds), 0.3 * len(labels) + 1.6))
  axes = fig.subplots(1, len(kinds), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    _panel(fig, ax, trace.scores[kind], labels, kind,
           f"{kind}: restoring after corrupted input", trace.low_score,
           f"p({trace.answer.strip()!r})")
  fig.suptitle(f"{trace.prompt!r} -> {trace.answer!r} (clean p="
               f"{trace.high_score:.3f}, corrupted p={trace.low_score:.3f})",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_average(average: dict, path: str, title: str = "") -> None:
  """Writes the average indirect effect per token group and layer."""
  from matplotlib.figure import Figure
  kinds = [k for k in KINDS if k in average]
  fig = Figure(figsize=(5.2 * len(kinds), 3.2))
  axes = fig.subplots(1, len(kinds), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    _panel(fig, ax, np.nan_to_num(average[kind]["effect"]), average["groups"],
           kind, f"average indirect effect: {kind}", 0.0, "AIE")
  fig.suptitle(title or "Average indirect effect", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
