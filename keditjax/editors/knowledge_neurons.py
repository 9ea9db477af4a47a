"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers").

Locate, then edit:

1. Attribution (paper §3.2, eq. 3-4). For a prompt x and the answer y*, the
   activation w of every intermediate MLP neuron (site `layer/{l}/mlp/key`,
   width F) at the prompt's last token is scaled from 0 to its value w̄ and
   the gradient of P(y* | x) is integrated along the way:

     Attr(w_i) = w̄_i / m * sum_{k=1..m} dP(k/m * w̄) / dw_i     (Riemann, eq. 4)

   As in the released code and EasyEdit, the whole layer's activation vector
   is scaled together (baseline: that layer zeroed at the last token), so per
   layer the scores sum to P(x) - P(layer zeroed) up to the Riemann error
   (IG completeness).
2. Refining (paper §3.3): per prompt keep the neurons scoring above
   `threshold` × the prompt's maximum score ("coarse" neurons); keep the ones
   found in at least `share_fraction` of the prompts; then (our addition, to
   bound the edit) the `max_neurons` with the largest mean score.
3. Updating facts (paper §5.1, eq. 5): for each selected neuron (l, i), row i
   of the MLP output kernel of layer l (its value slot, `value = key @ kernel`)
   becomes

     FFN_val_i <- FFN_val_i - λ1 * t + λ2 * t'

   with t, t' the word embeddings of the first token of the old and of the
   new answer (λ1 = `lambda_erase`, λ2 = `lambda_add`; defaults 1 and 8, our
   reading of the paper's setting, which was tuned for BERT: on SmolLM2 it
   wrecks unrelated facts). Two documented departures, both switchable:
   `sign_correct` multiplies the update by the sign of the neuron's activation
   on the edit prompt (SwiGLU activations can be negative, where the paper's
   rule would push *away* from t'; on 10 CounterFact edits of SmolLM2 with
   λ1 = λ2 = 2, efficacy is 8/10 with it and 3/10 without);
   `scale_by_value_norm` scales λ1, λ2 by
   ||FFN_val_i|| / ||t|| (resp. / ||t'||) as the authors' released code does.
   EasyEdit's variant (old answer = the greedy prediction, subtracted twice;
   each token of the new target added once; every coarse neuron kept; no sign
   correction) is, for single-token targets, `lambda_erase=2, lambda_add=1,
   sign_correct=False, max_neurons=None` on a request without `target_true`.

Everything is about the first token of an answer: the attribution target,
t and t'. Integrated gradients run over all selected layers and all m steps
in one jitted batch: the prompt's prefix goes once into a KV cache, and each
of the `layers × steps` rows then runs only the last token through the whole
model with its one layer's activation scaled (an additive site patch whose
per-neuron scale we differentiate). Rows are cut in chunks of `batch_size`
and prompts padded to length buckets, so a new request does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base
from keditjax.models import layers as layers_lib
from keditjax.models import lm
from keditjax.models import sites as sites_lib


@dataclasses.dataclass(frozen=True)
class KnowledgeNeuronsHParams:
  """Hyper-parameters of the knowledge-neurons editor.

  Attributes:
    layers: layers whose MLP neurons are attributed (None: all).
    steps: m, the Riemann steps of integrated gradients (paper: 20).
    threshold: t, keep neurons scoring above t × the prompt's max (paper: 0.2).
    share_fraction: p, keep neurons that are coarse for at least this fraction
      of the fact's prompts (trivially met with one prompt).
    max_neurons: keep at most this many neurons (largest mean score); None
      keeps all refined neurons.
    lambda_erase: λ1, the multiple of the old answer's embedding subtracted.
    lambda_add: λ2, the multiple of the new answer's embedding added.
    scale_by_value_norm: scale λ1, λ2 by ||value row|| / ||embedding|| (the
      authors' released code) instead of using them as absolute multiples.
    sign_correct: multiply the update by the sign of the neuron's activation
      on the edit prompt (see the module docstring).
    use_paraphrases: also attribute over the request dicts' `rephrase_prompt`
      / `paraphrase_prompts` (subject written out). Off by default: CounterFact
      uses those prompts to measure generalization.
    batch_size: integrated-gradient rows (layer, step) per jitted call.
  """
  layers: tuple[int, ...] | None = None
  steps: int = 20
  threshold: float = 0.2
  share_fraction: float = 0.5
  max_neurons: int | None = 5
  lambda_erase: float = 1.0
  lambda_add: float = 8.0
  scale_by_value_norm: bool = False
  sign_correct: bool = True
  use_paraphrases: bool = False
  batch_size: int = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnowledgeNeuronsState:
  """The parameter paths `apply` edits (static metadata only; the config
  and tokenizer come from the model given to `apply`)."""
  embed_path: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  value_paths: tuple[tuple[str, ...], ...] = dataclasses.field(
      metadata=dict(static=True))  # indexed by layer


def _check_hparams(h: KnowledgeNeuronsHParams) -> None:
  def bad(field, value, valid):
    raise errors.ConfigError(f"kn: {field}={value!r}; {valid}.")
  if not isinstance(h.steps, int) or h.steps < 1:
    bad("steps", h.steps, "use an int >= 1 (paper: 20)")
  if not 0.0 <= h.threshold < 1.0:
    bad("threshold", h.threshold, "use a fraction in [0, 1) (paper: 0.2)")
  if not 0.0 < h.share_fraction <= 1.0:
    bad("share_fraction", h.share_fraction, "use a fraction in (0, 1]")
  if h.max_neurons is not None and (not isinstance(h.max_neurons, int) or
                                    h.max_neurons < 1):
    bad("max_neurons", h.max_neurons, "use an int >= 1 or None")
  if not isinstance(h.batch_size, int) or h.batch_size < 1:
    bad("batch_size", h.batch_size, "use an int >= 1")
  for field in ("lambda_erase", "lambda_add"):
    if not np.isfinite(getattr(h, field)):
      bad(field, getattr(h, field), "use a finite number")
  if h.layers is not None and not isinstance(h.layers, tuple):
    bad("layers", h.layers, "use a tuple of layer indices or None")


# -- jitted passes ------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "cache_size"))
def _prefix_cache(config, params, prefix_1xL, mask_1xL, *, cache_size: int):
  """The KV cache of a right-padded prompt prefix (its padding slots stay -1)."""
  dtype = jax.tree.leaves(params)[0].dtype
  cache = layers_lib.init_cache(config, 1, cache_size, dtype)
  # One logit position: the prefix's logits are never used.
  _, _, cache = lm.run(config, params, prefix_1xL, attention_mask=mask_1xL,
                       cache=cache, logit_positions=jnp.zeros((1, 1), jnp.int32))
  return cache


def _tile_cache(cache, rows: int):
  def tile(x):
    return jnp.broadcast_to(x, (rows,) + x.shape[1:])
  return {"layers": [jax.tree.map(tile, c) for c in cache["layers"]],
          "pos": tile(cache["pos"]), "index": cache["index"]}


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _last_token(config, layers, params, cache, last_1x1):
  """Clean pass of the last token: next-token probs `[V]`, keys `[Ls, F]`."""
  names = tuple(f"layer/{l}/mlp/key" for l in layers)
  logits, out, _ = lm.run(config, params, last_1x1, cache=cache,
                          sites=sites_lib.capture(*names))
  probs_V = jax.nn.softmax(logits[0, -1].astype(jnp.float32))
  keys_LsxF = jnp.stack([out[n][0, -1].astype(jnp.float32) for n in names])
  return probs_V, keys_LsxF


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _ig_rows(config, layers, params, cache, last_1x1, answer, keys_LsxF,
             row_layer_R, row_alpha_R):
  """Integrand rows of eq. 4: `w̄ ⊙ dP(α w̄)/dw` for each (layer, α) row.

  Row r scales the activation of `layers[row_layer_R[r]]` at the last token by
  `row_alpha_R[r]` (rows with layer -1 are padding). The scale is a
  per-neuron vector s, so `dP/ds = w̄ ⊙ dP/dw` is the integrand directly.

  Returns:
    integrand `[R, F]` (at each row's own layer) and P(answer) `[R]`.
  """
  rows = row_layer_R.shape[0]
  cache_R = _tile_cache(cache, rows)
  tokens_Rx1 = jnp.broadcast_to(last_1x1, (rows, 1))
  layer_ids = jnp.arange(len(layers))
  scale_LsxRxF = jnp.where(
      row_layer_R[None, :, None] == layer_ids[:, None, None],
      row_alpha_R[None, :, None], 1.0)
  scale_LsxRxF = jnp.broadcast_to(scale_LsxRxF, (len(layers), rows,
                                                 keys_LsxF.shape[-1]))

  def answer_prob(scale_LsxRxF):
    # An additive patch (s - 1) ⊙ w̄ at the scaled layer turns w̄ into s ⊙ w̄;
    # at the other layers it adds zero to whatever activation arrives.
    patches = {
        f"layer/{l}/mlp/key": sites_lib.Patch(
            ((scale_LsxRxF[j] - 1.0) * keys_LsxF[j])[:, None, :])
        for j, l in enumerate(layers)}
    logits, _, _ = lm.run(config, params, tokens_Rx1, cache=cache_R,
                          sites=sites_lib.Sites(patches=patches))
    p_R = jax.nn.softmax(logits[:, -1].astype(jnp.float32), axis=-1)[:, answer]
    return p_R.sum(), p_R

  grads_LsxRxF, p_R = jax.grad(answer_prob, has_aux=True)(scale_LsxRxF)
  own = jnp.clip(row_layer_R, 0, len(layers) - 1)
  return grads_LsxRxF[own, jnp.arange(rows)], p_R


# -- attribution -----------------------------------------------------------

def _prepare(config, params, prompt_ids):
  """Prefix cache and last token of a prompt, padded to a length bucket."""
  prefix = list(prompt_ids[:-1])
  length = lm.bucket(len(prefix))
  tokens = np.zeros((1, length), np.int32)
  mask = np.zeros((1, length), np.int32)
  tokens[0, :len(prefix)] = prefix
  mask[0, :len(prefix)] = 1
  cache = _prefix_cache(config, params, jnp.asarray(tokens), jnp.asarray(mask),
                        cache_size=length + 1)
  return cache, jnp.asarray([[prompt_ids[-1]]], jnp.int32)


def next_token_probs(config, params, prompt_ids: Sequence[int],
                     layers: Sequence[int]):
  """P(next token | prompt) `[V]` and the MLP key activations `[Ls, F]`.

  Args:
    config, params: the model.
    prompt_ids: the prompt's token ids (non-empty).
    layers: layers whose `mlp/key` activation at the last token is returned.
  """
  cache, last = _prepare(config, params, prompt_ids)
  probs, keys = _last_token(config, tuple(layers), params, cache, last)
  return np.asarray(probs), np.asarray(keys)


def attribution_scores(config, params, prompt_ids: Sequence[int], answer: int,
                       layers: Sequence[int], steps: int = 20,
                       batch_size: int = 128):
  """Integrated-gradient attribution of every MLP neuron (Dai et al., eq. 4).

  Attr(w_i) = w̄_i / m * sum_{k=1..m} dP(y* | x, w = k/m w̄) / dw_i, with w the
  activation at `layer/{l}/mlp/key` at the prompt's last token, scaled as a
  whole layer; one jitted batch of `len(layers) × steps` rows per chunk.

  Args:
    config, params: the model.
    prompt_ids: the prompt's token ids (non-empty).
    answer: the answer's (first) token id y*.
    layers: the layers to attribute.
    steps: m, the Riemann steps.
    batch_size: rows per jitted call (fixed, so compiles repeat).

  Returns:
    `(scores_LsxF, details)`: float64 numpy scores (row j is `layers[j]`);
    details has `prob` (P(y*|x)), `keys` (`[Ls, F]` clean activations) and
    `probs` (the next-token distribution `[V]`).
  """
  layers = tuple(int(l) for l in layers)
  cache, last = _prepare(config, params, prompt_ids)
  probs, keys = _last_token(config, layers, params, cache, last)
  row_layer = np.repeat(np.arange(len(layers), dtype=np.int32), steps)
  row_alpha = np.tile(np.arange(1, steps + 1, dtype=np.float32) / steps,
                      len(layers))
  total = len(row_layer)
  padded = -(-total // batch_size) * batch_size
  row_layer = np.concatenate([row_layer, -np.ones(padded - total, np.int32)])
  row_alpha = np.concatenate([row_alpha, np.ones(padded - total, np.float32)])
  scores = np.zeros((len(layers), keys.shape[-1]), np.float64)
  answer = jnp.int32(answer)
  for start in range(0, padded, batch_size):
    chunk = slice(start, start + batch_size)
    integrand, _ = _ig_rows(config, layers, params, cache, last, answer, keys,
                            jnp.asarray(row_layer[chunk]),
                            jnp.asarray(row_alpha[chunk]))
    integrand = np.asarray(integrand, np.float64)
    real = row_layer[chunk] >= 0
    np.add.at(scores, row_layer[chunk][real], integrand[real])
  probs = np.asarray(probs)
  return scores / steps, {"prob": float(probs[int(answer)]),
                          "keys": np.asarray(keys), "probs": probs}


def select_neurons(scores_per_prompt: Sequence[np.ndarray],
                   layers: Sequence[int], threshold: float,
                   share_fraction: float, max_neurons: int | None):
  """Knowledge neurons from per-prompt attributions (Dai et al., §3.3).

  Args:
    scores_per_prompt: one `[Ls, F]` score array per prompt of the fact.
    layers: the model layer of each row.
    threshold: t; coarse neurons score > t × the prompt's max score.
    share_fraction: p; keep neurons coarse in >= p of the prompts.
    max_neurons: cap, by mean score over prompts (None: no cap).

  Returns:
    `(neurons, coarse_counts)`: a list of `(layer, index, mean score)`, best
    first, and the number of coarse neurons of each prompt.
  """
  counts = np.zeros(scores_per_prompt[0].shape, np.int64)
  coarse_counts = []
  for scores in scores_per_prompt:
    top = float(np.max(scores))
    coarse = scores > threshold * top if top > 0 else np.zeros_like(counts, bool)
    coarse_counts.append(int(coarse.sum()))
    counts += coarse
  mean = np.mean(np.stack(scores_per_prompt), axis=0)
  needed = share_fraction * len(scores_per_prompt) - 1e-9
  rows, cols = np.nonzero(counts >= max(needed, 1))
  order = np.argsort(-mean[rows, cols], kind="stable")
  if max_neurons is not None:
    order = order[:max_neurons]
  neurons = [(int(layers[rows[k]]), int(cols[k]), float(mean[rows[k], cols[k]]))
             for k in order]
  return neurons, coarse_counts


# -- editing ---------------------------------------------------------------

def value_row_updates(params, state: KnowledgeNeuronsState, neurons,
                      old_token: int, new_token: int, signs,
                      hparams: KnowledgeNeuronsHParams) -> dict:
  """New MLP output kernels after the fact update (Dai et al., eq. 5).

  Row i of layer l's kernel gains `sign * (λ2 t' - λ1 t)`, where t, t' are
  the embedding rows of `old_token`, `new_token` (λ scaled by
  ||row|| / ||embedding|| under `scale_by_value_norm`).

  Args:
    params: the parameter pytree (not modified).
    state: from `init` (parameter paths).
    neurons: `(layer, index, ...)` tuples.
    old_token, new_token: token ids of t and t'.
    signs: one ±1 per neuron (all 1 without sign correction).
    hparams: λ1, λ2 and the scaling rule.

  Returns:
    parameter path -> new kernel (only the kernels with a selected row).
  """
  embedding = base.get_leaf(params, state.embed_path)
  old_e = np.asarray(embedding[old_token], np.float32)
  new_e = np.asarray(embedding[new_token], np.float32)
  updates = {}
  for (layer, index, *_), sign in zip(neurons, signs):
    path = state.value_paths[layer]
    kernel = updates.get(path, base.get_leaf(params, path))
    # Only the D-wide row travels to the host; the kernel stays where it is.
    row = np.asarray(kernel[index], np.float32)
    erase, add = hparams.lambda_erase, hparams.lambda_add
    if hparams.scale_by_value_norm:
      row_norm = float(np.linalg.norm(row))
      erase *= row_norm / max(float(np.linalg.norm(old_e)), 1e-12)
      add *= row_norm / max(float(np.linalg.norm(new_e)), 1e-12)
    new_row = row + sign * (add * new_e - erase * old_e)
    updates[path] = jnp.asarray(kernel).at[index].set(
        jnp.asarray(new_row, kernel.dtype))
  return updates


def _paraphrases(item) -> list[str]:
  if not isinstance(item, Mapping):
    return []
  found = []
  for key in ("rephrase_prompt", "paraphrase_prompts"):
    value = item.get(key)
    if isinstance(value, str):
      value = [value]
    for text in value or []:
      if not isinstance(text, str) or not text.strip():
        raise errors.InputError(f"{key} holds an empty or non-string prompt.")
      found.append(text)
  return found


def knowledge_neurons(hparams: KnowledgeNeuronsHParams = KnowledgeNeuronsHParams()
                      ) -> base.FunctionalEditor:
  """The knowledge-neurons editor (Dai et al. 2022).

  Args:
    hparams: `KnowledgeNeuronsHParams`.

  Returns:
    `Editor(name="kn")`: `init(model, params=None) -> KnowledgeNeuronsState`,
    `apply(model, params, requests, state) -> (new_params, state, EditInfo)`.

  Raises:
    ConfigError: invalid hyper-parameters.
  """
  _check_hparams(hparams)

  def init(model, params=None):
    """State for `apply`: the value/embedding paths."""
    del params
    config = model.config
    if getattr(model, "tokenizer", None) is None:
      raise errors.TokenizerError(f"kn needs a tokenizer; {model!r} has none.")
    if hparams.layers is not None:
      base.check_layers(hparams.layers, config.num_layers, "kn.layers")
    return KnowledgeNeuronsState(
        embed_path=model.site_param("embed"),
        value_paths=tuple(model.site_param(f"layer/{l}/mlp/value")
                          for l in range(config.num_layers)))

  def apply(model, params, requests, state: KnowledgeNeuronsState):
    """Edits each request in turn (later ones see earlier edits).

    The old answer t is `target_true`'s first token; a request without
    `target_true` uses the model's greedy next token on its prompt instead
    (reported as `old_source="greedy"` in `info.extras`).

    Returns:
      `(new_params, state, info)`; `info.extras["requests"]` lists, per
      request, the neurons `(layer, index, score)`, the old/new token ids and
      P(old) before the edit.

    Raises:
      InputError: a bad request, or a prompt/target that tokenizes to nothing.
      ConfigError: `layers` out of range.
    """
    if isinstance(requests, (base.Request, Mapping)):
      raw = [requests]
    else:
      try:
        raw = list(requests)
      except TypeError:
        raise errors.InputError(
            f"requests must be a Request, a dict or a list of those, got "
            f"{type(requests).__name__}.") from None
    checked = base.make_requests(raw)
    config, tok = model.config, model.tokenizer
    if tok is None:
      raise errors.TokenizerError(f"kn needs a tokenizer; {model!r} has none.")
    layers = base.check_layers(
        range(config.num_layers) if hparams.layers is None else hparams.layers,
        config.num_layers, "kn.layers")
    base.get_leaf(params, state.embed_path)
    for l in layers:
      base.get_leaf(params, state.value_paths[l])

    def ids(text, what, case_id):
      out = tok.encode(text)
      if not out:
        raise errors.InputError(
            f"request {case_id!r}: {what} {text!r} tokenizes to nothing.")
      if len(out) > config.max_position_embeddings:
        raise errors.InputError(
            f"request {case_id!r}: {what} has {len(out)} tokens, more than "
            f"max_position_embeddings={config.max_position_embeddings}.")
      return out

    jobs = []
    for item, req in zip(raw, checked):
      prompts = [req.text] + (_paraphrases(item) if hparams.use_paraphrases
                              else [])
      jobs.append(dict(
          request=req,
          prompt_ids=[ids(p, "prompt", req.case_id) for p in prompts],
          new=ids(req.target_new, "target_new", req.case_id)[0],
          true=(None if req.target_true is None else
                ids(req.target_true, "target_true", req.case_id)[0])))

    timer = base.Timer()
    current, updates, reports, touched = params, {}, [], []
    for job in jobs:
      with timer("attribution"):
        probs, keys = next_token_probs(config, current, job["prompt_ids"][0],
                                       layers)
        old = job["true"] if job["true"] is not None else int(np.argmax(probs))
        all_scores = [attribution_scores(config, current, p, old, layers,
                                         hparams.steps, hparams.batch_size)[0]
                      for p in job["prompt_ids"]]
      with timer("select"):
        neurons, coarse = select_neurons(all_scores, layers, hparams.threshold,
                                         hparams.share_fraction,
                                         hparams.max_neurons)
      with timer("edit"):
        row = {l: j for j, l in enumerate(layers)}
        signs = [(1.0 if keys[row[l], i] >= 0 else -1.0)
                 if hparams.sign_correct else 1.0 for l, i, _ in neurons]
        new_kernels = value_row_updates(current, state, neurons, old,
                                        job["new"], signs, hparams)
        current = base.replace_leaves(current, new_kernels)
        updates.update(new_kernels)
        touched.append(tuple(base.LeafDelta(p) for p in new_kernels))
      reports.append({
          "case_id": job["request"].case_id,
          "neurons": neurons,
          "signs": signs,
          "coarse_per_prompt": coarse,
          "old_token": int(old),
          "old_source": "target_true" if job["true"] is not None else "greedy",
          "new_token": int(job["new"]),
          "prob_old_before": float(probs[old]),
          "prob_new_before": float(probs[job["new"]]),
      })
    with timer("describe"):
      changed = base.describe_changes(params, updates)
    info = base.EditInfo(changed=changed, seconds=timer.seconds,
                         extras={"requests": reports},
                         records=base.make_records(
                             "kn", [job["request"] for job in jobs], touched))
    return current, state, info

  return base.FunctionalEditor("kn", hparams, init, apply)


__all__ = ["KnowledgeNeuronsHParams", "KnowledgeNeuronsState",
           "attribution_scores", "knowledge_neurons", "next_token_probs",
           "select_neurons", "value_row_updates"]
