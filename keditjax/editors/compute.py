"""What ROME, MEMIT and AlphaEdit share: prompts, keys k* and values v*.

  - `context_templates`: short prefixes the model writes itself, so a key or
    value is averaged over contexts (ROME §3.1).
  - `Layout`: prompts tokenized around the subject, laid out so that every
    row's subject-last token sits in the same column: the columns before it
    (the prefix) cannot depend on an edit at that token.
  - `subject_keys`: k*, the mean key at a layer at the subject's last token.
  - `optimize_values`: v* (ROME eq. 4 / MEMIT eq. 16): a delta added at the
    subject's last token after block `layer`, optimised for the new target
    with a KL "essence" term and weight decay, as jitted `while_loop`s over
    a pool of request slots, a slot refilled as soon as its request stops
    (continuous batching).

The value optimisation avoids work the delta cannot change: the prefix runs
once into a KV cache, the blocks up to `layer` run once on the suffix, each
step runs only blocks above `layer` on the suffix columns, logits are taken
only at target positions, and the loop stops per request when its loss falls
below `stop_loss` (ROME's criterion).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors, progress
from keditjax.editors.base import Request
from keditjax.models import adapters as adapters_lib
from keditjax.models import layers as layers_lib
from keditjax.models import lm
from keditjax.models import precision
from keditjax.models import sites as sites_lib

CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_templates(model, params=None, lengths=((5, 10), (10, 10)),
                      seed: int = 0) -> tuple[str, ...]:
  """`"{}"` plus prefixes sampled from the model (ROME's context templates).

  For each `(length, count)`, `count` texts of `length` new tokens start from
  "The", "Therefore", "Because", "I", "You" (nucleus sampling, fixed seed);
  each becomes the template `"<text>. {}"`.
  """
  params = model.params if params is None else params
  out = ["{}"]
  for length, count in lengths:
    starts = [CONTEXT_STARTS[i % len(CONTEXT_STARTS)] for i in range(count)]
    texts = model.generate(params, starts, max_new_tokens=length,
                           temperature=0.8, top_p=0.9, seed=seed + length,
                           stop_at_eos=True)
    for start, text in zip(starts, texts):
      text = (start + text).replace("{", " ").replace("}", " ")
      text = " ".join(text.split())
      out.append(text + ". {}")
  return tuple(out)


def tokenize_around_subject(tokenizer, template: str, subject: str):
  """Token ids of `template` with the subject, and the subject's last index.

  The text before the subject, the subject and the text after it are
  tokenized separately and concatenated (as ROME does), so the subject's
  tokens are the same in every context; a space before the subject moves
  into the subject, as byte-level BPE attaches spaces to the next word.

  Returns:
    (ids, index of the subject's last token).
  """
  pre, post = template.split("{}", 1)
  lead = ""
  if pre.endswith(" "):
    pre, lead = pre[:-1], " "
  pre_ids = tokenizer.encode(pre) if pre else []
  subj_ids = tokenizer.encode(lead + subject)
  post_ids = tokenizer.encode(post) if post else []
  if not subj_ids:
    raise errors.InputError(f"subject {subject!r} tokenizes to nothing.")
  ids = pre_ids + subj_ids + post_ids
  return ids, len(pre_ids) + len(subj_ids) - 1


def encode_target(tokenizer, request: Request) -> list[int]:
  ids = tokenizer.encode(request.target_new)
  if not ids:
    raise errors.InputError(
        f"request {request.case_id!r}: target_new {request.target_new!r} "
        "tokenizes to nothing.")
  return ids


def fill(template: str, request: Request) -> str:
  """A context template around the request's prompt (`{}` kept for subject)."""
  return template.replace("{}", request.prompt, 1)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Rows split at the subject's last token (column `S` of every row).

  prefix_* `[B, S]` holds each row's tokens before the subject's last token,
  left-padded; suffix_* `[B, P]` holds the rest (starting with that token),
  right-padded. `target_*` `[B, T]` are suffix positions whose logits
  predict `target_ids`.
  """
  prefix_tokens: np.ndarray
  prefix_mask: np.ndarray
  suffix_tokens: np.ndarray
  suffix_mask: np.ndarray
  target_pos: np.ndarray
  target_ids: np.ndarray
  target_mask: np.ndarray


# Shape buckets of the v* loop. Each new (prefix, suffix, target) shape
# compiles `_prepare` and `_optimize` (~5 s on a 2-core CPU), while padding
# costs step time on every edit. On the first 2,000 CounterFact records
# (ROME's 21 templates): subject-last index 15/19/23/35 tokens (median, 90th,
# 99th percentile, max), suffix 2-8 tokens (median 4), target 1 (89%) to 3.
# Ten steps cost ~0.59 s more per suffix token but only ~0.06 s per prefix
# token (docs/benchmarks/vstar_buckets_avx2.json, a least-squares fit over
# timed edits). Suffix buckets 4/6/8 and target buckets 1/3 with the prefix
# at multiples of 16 need 13 shapes (23 with the earlier 1,2,3,4,6,8
# buckets) at ~7% more step time on that distribution; prefix multiples of
# 32 would need 7 shapes but cost ~20%.
PREFIX_MULTIPLE = 16
SUFFIX_BUCKETS = (4, 6, 8)  # then multiples of 8
TARGET_BUCKETS = (1, 3)  # then multiples of 4


def _bucket(n: int, sizes: Sequence[int], multiple: int) -> int:
  for size in sizes:
    if n <= size:
      return size
  return lm.bucket(n, multiple)


def suffix_bucket(n: int) -> int:
  """A suffix length rounded up to 4, 6, 8, then a multiple of 8."""
  return _bucket(n, SUFFIX_BUCKETS, 8)


def target_bucket(n: int) -> int:
  """A target length rounded up to 1, 3, then a multiple of 4."""
  return _bucket(n, TARGET_BUCKETS, 4)


def make_layout(rows, *, multiple: int = PREFIX_MULTIPLE,
                prefix_len: int | None = None) -> Layout:
  """Builds a `Layout` from `(ids, subject_last, target_ids)` rows.

  The prefix length is rounded up to `multiple` (it is computed once per
  edit), suffix and target lengths by `suffix_bucket` and `target_bucket`,
  so that similar batches share one compilation.
  """
  n = len(rows)
  s = prefix_len or lm.bucket(max(r[1] for r in rows), multiple)
  p = suffix_bucket(max(len(r[0]) - r[1] + max(len(r[2]) - 1, 0)
                        for r in rows))
  t = target_bucket(max(max(len(r[2]), 1) for r in rows))
  out = dict(prefix_tokens=np.zeros((n, s), np.int32),
             prefix_mask=np.zeros((n, s), np.int32),
             suffix_tokens=np.zeros((n, p), np.int32),
             suffix_mask=np.zeros((n, p), np.int32),
             target_pos=np.zeros((n, t), np.int32),
             target_ids=np.zeros((n, t), np.int32),
             target_mask=np.zeros((n, t), np.float32))
  for i, (ids, last, target) in enumerate(rows):
    full = list(ids) + list(target[:-1])
    if last:
      out["prefix_tokens"][i, s - last:] = full[:last]
      out["prefix_mask"][i, s - last:] = 1
    tail = full[last:]
    out["suffix_tokens"][i, :len(tail)] = tail
    out["suffix_mask"][i, :len(tail)] = 1
    for j, tok in enumerate(target):
      out["target_pos"][i, j] = len(ids) - 1 + j - last
      out["target_ids"][i, j] = tok
      out["target_mask"][i, j] = 1.0
  return Layout(**out)


def capture_at_subject(model, params, texts_and_lasts, names: Sequence[str],
                       *, batch_size: int = 64):
  """Activations at each row's subject-last token, for site `names`.

  Args:
    texts_and_lasts: `(ids, subject_last)` rows.
    names: site names (their highest layer bounds the partial pass).

  Returns:
    dict name -> float32 numpy `[N, D or F]`.
  """
  stop = 1 + max(sites_lib.parse_site(n, model.config.num_layers)[0]
                 for n in names)
  return RowStream(model, texts_and_lasts, batch_size=batch_size).peek(
      params, stop, tuple(names))


@functools.partial(jax.jit, static_argnames=("config", "start", "stop",
                                             "names", "keep"))
def _block_pass(config, params, hidden, tokens_BxL, mask_BxL, last_Bx1, *,
                start, stop, names, keep):
  sites = sites_lib.capture(*names, positions=last_Bx1)
  h, out, _ = lm.run(config, params, None if start else tokens_BxL,
                     hidden=hidden if start else None, start_layer=start,
                     stop_layer=stop, attention_mask=mask_BxL, sites=sites)
  return (h if keep else None), {name: out[name][:, 0] for name in names}


class RowStream:
  """Prompt rows carried block by block through a model edited bottom-up.

  MEMIT edits its layers in ascending order and needs, at each layer, keys
  (and z) computed on the model with the lower layers already edited. An
  edit at layer l cannot change the residual stream entering l, so the
  stream keeps every row's hidden state entering the next layer to edit and
  runs each block once, instead of re-running the model from the embeddings
  at every layer. Memory: rows × padded length × hidden size float32.

  Args:
    model: the `LanguageModel`.
    rows: `(ids, subject_last)` rows.
    batch_size: rows per jitted pass (fixed, so one compilation per span).
  """

  def __init__(self, model, rows, *, batch_size: int = 64):
    self.config = model.config
    self.n = len(rows)
    self.batches, self.hidden, self.at = [], [], 0
    batch_size = min(batch_size, lm.bucket(len(rows), 8))
    length = lm.bucket(max(len(ids) for ids, _ in rows), 16)
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      tokens = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      last = np.zeros((batch_size, 1), np.int32)
      for i, (ids, s) in enumerate(chunk):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
        last[i, 0] = s
      self.batches.append(tuple(map(jnp.asarray, (tokens, mask, last))))
      self.hidden.append(None)

  def _run(self, params, stop, names, keep):
    got = {name: [] for name in names}
    new_hidden = []
    for (tokens, mask, last), hidden in zip(self.batches, self.hidden):
      h, out = _block_pass(self.config, params, hidden, tokens, mask, last,
                           start=self.at, stop=stop, names=tuple(names),
                           keep=keep)
      new_hidden.append(h)
      for name in names:
        got[name].append(np.asarray(out[name]))
    return new_hidden, {k: np.concatenate(v)[:self.n] for k, v in got.items()}

  def peek(self, params, stop: int, names: Sequence[str]):
    """Captures at the subject-last token of blocks in `[at, stop)`.

    Returns:
      dict name -> float32 numpy `[N, ...]`; the stream does not move.
    """
    return self._run(params, stop, names, keep=False)[1]

  def advance(self, params, stop: int) -> None:
    """Moves the stream to the input of block `stop` under `params`."""
    if stop != self.at:
      self.hidden, _ = self._run(params, stop, (), keep=True)
      self.at = stop


def subject_keys(model, params, requests, templates, layer_sites,
                 *, batch_size: int = 64):
  """Mean activation at the subject's last token over context templates.

  For `layer/{l}/mlp/key` this is ROME's k* (eq. 3) and MEMIT's kᵢ.

  Returns:
    dict site -> `[R, F]` float32 numpy.
  """
  rows = []
  for request in requests:
    for template in templates:
      rows.append(tokenize_around_subject(
          model.tokenizer, fill(template, request), request.subject))
  got = capture_at_subject(model, params, rows, layer_sites,
                           batch_size=batch_size)
  n = len(templates)
  return {k: v.reshape(len(requests), n, -1).mean(axis=1)
          for k, v in got.items()}


# -- v* optimisation --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ValueHParams:
  """Hyper-parameters of the v* optimisation (ROME's names in brackets).

  Attributes:
    steps: maximum gradient steps [v_num_grad_steps].
    lr: Adam learning rate [v_lr].
    weight_decay: weight of ||δ|| / ||v0||² [v_weight_decay].
    kl_factor: weight of KL(p_δ || p_0) on "{subject} is a" [kl_factor].
    clamp_norm_factor: ||δ|| ≤ factor · ||v0|| [clamp_norm_factor].
    stop_loss: a request stops once its loss is below this (ROME: 5e-2).
    stop_on: "nll" stops when the target NLL alone is below `stop_loss`
      (the target is reached); "loss" when NLL + KL + weight decay is, as
      ROME does. On SmolLM2 the KL term plateaus near 0.05 with the target
      long reached, so "loss" usually runs every step for nothing.
    compute_dtype: "float32", or "bfloat16" for the network's matmuls
      (forward and backward; float32 accumulation, norms, softmax and loss;
      see `keditjax.models.precision`). The editors' `v_compute_dtype`
      may also be "auto", which `value_hparams` resolves
      (`precision.resolve`: bfloat16 only with native bfloat16 matmuls).
    scan_layers: run the prefix pass and the blocks above the edit layer
      as one `lax.scan` each (`lm.prefill_scanned`, `lm.run_scanned`):
      traces and compiles about twice as fast (a ROME edit meeting a new
      prompt shape: +3.7 s instead of +7.4 s on SmolLM2, CPU;
      docs/benchmarks/edit_rome_cpu*.json) at no cost in step time. The
      default; False unrolls the layers.
  """
  steps: int = 20
  lr: float = 0.5
  weight_decay: float = 0.5
  kl_factor: float = 0.0625
  clamp_norm_factor: float = 4.0
  stop_loss: float = 5e-2
  stop_on: str = "nll"
  compute_dtype: str = "float32"
  scan_layers: bool = True

  def __post_init__(self):
    precision.check(self.compute_dtype)
    if self.stop_on not in ("nll", "loss"):
      raise errors.ConfigError(
          f"stop_on (v_stop_on)={self.stop_on!r}; use 'nll' or 'loss'.")
    if self.steps < 1 or self.lr <= 0 or self.clamp_norm_factor <= 0:
      raise errors.ConfigError(
          f"value optimisation needs steps (v_steps) >= 1, lr (v_lr) > 0 and "
          f"clamp_norm_factor > 0; got {self.steps}, {self.lr}, "
          f"{self.clamp_norm_factor}.")


def value_hparams(hp) -> ValueHParams:
  """The v* settings of an editor's hparams (fields `v_steps`, `v_lr`, ...)."""
  return ValueHParams(
      steps=hp.v_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
      kl_factor=hp.kl_factor, clamp_norm_factor=hp.clamp_norm_factor,
      stop_loss=hp.v_stop_loss, stop_on=hp.v_stop_on,
      compute_dtype=precision.resolve(hp.v_compute_dtype),
      scan_layers=hp.v_scan_layers)


KL_PROMPTS = ("{} is a",)


@functools.partial(jax.jit, static_argnames=("config", "start",
                                             "compute_dtype"))
def stacked_blocks(config, params, *, start, compute_dtype="float32"):
  """Blocks `[start, L)` stacked for a scan, dense kernels in the compute
  dtype: one copy made once per edit, read in place by `_prepare` and every
  step of `_optimize` (see `lm.run_scanned`'s `blocks`)."""
  blocks = lm.stack_blocks(config, params, start)["params"]
  if compute_dtype == "float32":
    return blocks
  cast = lambda path, x: (x.astype(jnp.bfloat16) if precision.path_str(
      path).endswith("kernel") and x.ndim == 3 else x)
  return jax.tree_util.tree_map_with_path(cast, blocks)


@functools.partial(jax.jit, static_argnames=("config", "layer", "site_kind",
                                             "compute_dtype"))
def _prepare(config, params, blocks, prefix_tokens, prefix_mask,
             suffix_tokens, suffix_mask, *, layer, site_kind,
             compute_dtype="float32"):
  """The prefix KV cache and the residual stream after block `layer`.

  `blocks` (or None: every layer unrolled) are the stacked blocks above
  `layer` (`stacked_blocks`); `params` need hold compute-dtype kernels only
  up to `layer`.
  """
  with precision.compute_dtype(compute_dtype):
    return _prepare_body(config, params, blocks, prefix_tokens, prefix_mask,
                         suffix_tokens, suffix_mask, layer, site_kind)


def _prepare_body(config, params, blocks, prefix_tokens, prefix_mask,
                  suffix_tokens, suffix_mask, layer, site_kind):
  batch, s = prefix_tokens.shape
  p = suffix_tokens.shape[1]
  cache = layers_lib.init_cache(config, batch, s + p,
                                params_dtype(params))
  if blocks is not None:  # one traced block: a one-off edit compiles faster
    cache = lm.prefill_scanned(config, params, prefix_tokens,
                               attention_mask=prefix_mask, cache=cache,
                               scan_from=layer + 1, blocks=blocks)
  else:
    _, _, cache = lm.run(config, params, prefix_tokens,
                         attention_mask=prefix_mask, cache=cache,
                         logit_positions=jnp.zeros((batch, 1), jnp.int32))
  site = f"layer/{layer}/{site_kind}"
  hidden_BxPxD, out, _ = lm.run(
      config, params, suffix_tokens, attention_mask=suffix_mask, cache=cache,
      stop_layer=layer + 1,
      sites=sites_lib.capture(site, positions=jnp.zeros((1,), jnp.int32)))
  return cache, hidden_BxPxD, out[site][:, 0]


def params_dtype(params):
  """The dtype of the params' embedding-scale leaves (the KV cache's)."""
  return jax.tree.leaves(params)[0].dtype


@functools.partial(jax.jit, static_argnames=("config", "layer", "hp"))
def _optimize(config, params, blocks, cache, hidden_BxPxD, suffix_mask,
              target_pos, target_ids, target_mask, row_request, row_weight,
              row_is_kl, init_norm_R, *, layer, hp: ValueHParams):
  """One jitted loop: Adam on δ `[R, D]` until every request stops."""
  with precision.compute_dtype(hp.compute_dtype):
    return _optimize_body(config, params, blocks, cache, hidden_BxPxD,
                          suffix_mask, target_pos, target_ids, target_mask,
                          row_request, row_weight, row_is_kl, init_norm_R,
                          layer, hp)


def _value_fns(config, params, blocks, stacked, cache, hidden_BxPxD,
               suffix_mask, target_pos, target_ids, target_mask, row_request,
               row_weight, row_is_kl, init_norm_R, layer, hp):
  """The v* objective, shared by `_optimize` and the slot pool (`_segment`).

  Args:
    stacked: `lm.blocks_and_cache(config, blocks, layer + 1, cache)`, or
      None with `blocks` None (every layer unrolled).
    (the rest): as in `_optimize`.

  Returns:
    (log_probs, losses): `log_probs(delta_RxD)` -> `[B, T, V]` log-probs at
    the target positions, and `losses(delta_RxD, kl_init_BxV)` -> (summed
    loss, (loss_R, nll_R)), where `kl_init_BxV` are the log-probs at δ = 0
    of each row's first target position (the KL reference).
  """
  num_requests = init_norm_R.shape[0]
  col0_P = (jnp.arange(hidden_BxPxD.shape[1]) == 0).astype(hidden_BxPxD.dtype)

  def log_probs(delta_RxD):
    h = hidden_BxPxD + (col0_P[None, :, None] *
                        delta_RxD[row_request][:, None, :])
    if blocks is not None:
      logits_BxTxV = lm.run_scanned(
          config, params, h, start_layer=layer + 1, cache=cache,
          attention_mask=suffix_mask, logit_positions=target_pos,
          stacked=stacked)
    else:
      logits_BxTxV, _, _ = lm.run(config, params, hidden=h,
                                  start_layer=layer + 1, cache=cache,
                                  attention_mask=suffix_mask,
                                  logit_positions=target_pos)
    return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)

  def losses(delta_RxD, kl_init_BxV):
    logp = log_probs(delta_RxD)
    tok_lp = jnp.take_along_axis(logp, target_ids[..., None], -1)[..., 0]
    row_nll = -jnp.sum(tok_lp * target_mask, -1) / jnp.maximum(
        jnp.sum(target_mask, -1), 1.0)
    kl_row = jnp.sum(jnp.exp(logp[:, 0]) * (logp[:, 0] - kl_init_BxV), -1)
    per_row = jnp.where(row_is_kl, hp.kl_factor * kl_row, row_nll * row_weight)
    per_request = jax.ops.segment_sum(per_row, row_request, num_requests)
    nll = jax.ops.segment_sum(jnp.where(row_is_kl, 0.0, row_nll * row_weight),
                              row_request, num_requests)
    # sqrt(x + tiny): the norm's gradient at δ = 0 is 0, not NaN.
    norm_R = jnp.sqrt(jnp.sum(delta_RxD**2, axis=-1) + 1e-30)
    wd = hp.weight_decay * norm_R / init_norm_R**2
    total = per_request + wd
    return jnp.sum(total), (total, nll)

  return log_probs, losses


def _optimize_body(config, params, blocks, cache, hidden_BxPxD, suffix_mask,
                   target_pos, target_ids, target_mask, row_request,
                   row_weight, row_is_kl, init_norm_R, layer, hp):
  num_requests = init_norm_R.shape[0]
  dim = hidden_BxPxD.shape[-1]

  # With `blocks`, the blocks above `layer` run as one scanned block: the
  # loop compiles one block's forward and backward, not one per layer.
  stacked = lm.blocks_and_cache(config, blocks, layer + 1, cache)
  log_probs, losses = _value_fns(
      config, params, blocks, stacked, cache, hidden_BxPxD, suffix_mask,
      target_pos, target_ids, target_mask, row_request, row_weight,
      row_is_kl, init_norm_R, layer, hp)
  kl_init_BxV = jax.lax.stop_gradient(log_probs(
      jnp.zeros((num_requests, dim), hidden_BxPxD.dtype))[:, 0])

  opt = optax.adam(hp.lr)
  grad_fn = jax.value_and_grad(lambda delta: losses(delta, kl_init_BxV),
                               has_aux=True)
  max_norm_R = hp.clamp_norm_factor * init_norm_R

  def cond(carry):
    step, _, _, active, _, _, _, _ = carry
    return (step < hp.steps) & jnp.any(active)

  def body(carry):
    step, delta, opt_state, active, loss_R, nll_R, steps_R, history = carry
    (_, (total, nll)), grad = grad_fn(delta)
    history = history.at[step].set(jnp.where(active, nll, jnp.nan))
    # A request's last computed loss is the one reported.
    loss_R = jnp.where(active, total, loss_R)
    nll_R = jnp.where(active, nll, nll_R)
    # ROME checks the loss before stepping, and never steps on the last pass.
    watched = nll if hp.stop_on == "nll" else total
    active = active & (watched >= hp.stop_loss) & (step < hp.steps - 1)
    updates, new_opt_state = opt.update(grad, opt_state, delta)
    new_delta = delta + updates
    norm = jnp.linalg.norm(new_delta, axis=-1, keepdims=True)
    new_delta = new_delta * jnp.minimum(1.0, max_norm_R[:, None] /
                                        jnp.maximum(norm, 1e-12))
    delta = jnp.where(active[:, None], new_delta, delta)
    opt_state = jax.tree.map(
        lambda new, old: jnp.where(
            active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        if new.ndim and new.shape[0] == num_requests else new,
        new_opt_state, opt_state)
    return (step + 1, delta, opt_state, active, loss_R, nll_R,
            steps_R + active.astype(jnp.int32), history)

  delta0 = jnp.zeros((num_requests, dim), hidden_BxPxD.dtype)
  init = (jnp.int32(0), delta0, opt.init(delta0),
          jnp.ones((num_requests,), bool),
          jnp.zeros((num_requests,), jnp.float32),
          jnp.zeros((num_requests,), jnp.float32),
          jnp.zeros((num_requests,), jnp.int32),
          jnp.full((hp.steps, num_requests), jnp.nan, jnp.float32))
  _, delta, _, _, loss_R, nll_R, steps_R, history = jax.lax.while_loop(
      cond, body, init)
  return delta, steps_R, loss_R, nll_R, history.T


# -- continuous batching: a pool of request slots ---------------------------
#
# Requests stop at very different steps, so a chunk that runs until its
# slowest request stops leaves finished slots idle. The pool keeps `C`
# request slots (each a fixed block of rows: its templates, then its KL
# prompts) and refills a slot as soon as its request stops. `data` holds
# what each row computes with (prepared once per request, never changed by
# a step); `slots` the optimisation state, per request slot, with its own
# Adam state and step count, so a request refilled late follows exactly the
# trajectory it would follow from step 0 of a chunk.


@functools.partial(jax.jit, static_argnames=("config", "layer", "site_kind",
                                             "hp", "rows_per_request"))
def _prepare_slots(config, params, blocks, layout, row_request, *, layer,
                   site_kind, hp, rows_per_request):
  """`_prepare` for a chunk of requests entering the pool.

  Also computes what `_optimize` computes before its loop: the KL reference
  log-probs at δ = 0 and the norm of v0; with `blocks`, the cache above
  `layer` is stacked here once instead of on every segment.

  Returns:
    dict with `rows` (per-row arrays, rows first), `stacked` (the stacked
    cache, rows second; {} without `blocks`), `index` (the cache's next
    slot), `init_norm` `[C]` and `v0` `[C, D]`.
  """
  with precision.compute_dtype(hp.compute_dtype):
    cache, hidden_BxPxD, site_BxD = _prepare_body(
        config, params, blocks, layout["prefix_tokens"],
        layout["prefix_mask"], layout["suffix_tokens"], layout["suffix_mask"],
        layer, site_kind)
    v0_CxD = site_BxD[::rows_per_request]
    init_norm_C = jnp.linalg.norm(v0_CxD, axis=-1)
    stacked = lm.blocks_and_cache(config, blocks, layer + 1, cache)
    log_probs, _ = _value_fns(
        config, params, blocks, stacked, cache, hidden_BxPxD,
        layout["suffix_mask"], layout["target_pos"], layout["target_ids"],
        layout["target_mask"], row_request, None, None, init_norm_C, layer,
        hp)
    kl_init_BxV = log_probs(jnp.zeros_like(v0_CxD))[:, 0]
  rows = dict(hidden=hidden_BxPxD, kl_init=kl_init_BxV, pos=cache["pos"],
              layers=[] if blocks is not None else cache["layers"],
              **{k: layout[k] for k in ("suffix_mask", "target_pos",
                                        "target_ids", "target_mask")})
  return dict(rows=rows, stacked={} if stacked is None else stacked["cache"],
              index=cache["index"], init_norm=init_norm_C, v0=v0_CxD)


def _empty_slots(num_slots: int, dim: int, dtype, steps: int, lr: float,
                 num_active: int):
  """Optimisation state of `num_slots` slots; the first `num_active` start."""
  delta_CxD = jnp.zeros((num_slots, dim), dtype)
  return dict(delta=delta_CxD,
              opt=jax.vmap(optax.adam(lr).init)(delta_CxD),
              active=jnp.arange(num_slots) < num_active,
              loss=jnp.zeros((num_slots,), jnp.float32),
              nll=jnp.zeros((num_slots,), jnp.float32),
              steps=jnp.zeros((num_slots,), jnp.int32),
              history=jnp.full((num_slots, steps), jnp.nan, jnp.float32))


@functools.partial(jax.jit, donate_argnames=("data", "slots"))
def _refill(data, slots, incoming, dest_C):
  """Slot `dest_C[j]` takes request j of `incoming` (`_prepare_slots`) and
  starts afresh; `dest_C[j]` = C (out of range) skips request j."""
  num_slots = dest_C.shape[0]
  rows_per_request = data["rows"]["hidden"].shape[0] // num_slots
  dest_B = (dest_C[:, None] * rows_per_request +
            jnp.arange(rows_per_request)).reshape(-1)

  def put(index, axis=0):
    where = (slice(None),) * axis + (index,)
    return lambda old, new: old.at[where].set(new, mode="drop")

  data = dict(data, rows=jax.tree.map(put(dest_B), data["rows"],
                                      incoming["rows"]),
              stacked=jax.tree.map(put(dest_B, 1), data["stacked"],
                                   incoming["stacked"]),
              init_norm=put(dest_C)(data["init_norm"], incoming["init_norm"]))
  fresh = dict(jax.tree.map(jnp.zeros_like, slots),
               active=jnp.ones_like(slots["active"]),
               history=jnp.full_like(slots["history"], jnp.nan))
  return data, jax.tree.map(put(dest_C), slots, fresh)


@functools.partial(jax.jit, static_argnames=("config", "layer", "hp"),
                   donate_argnames=("slots",))
def _segment(config, params, blocks, data, slots, row_request, row_weight,
             row_is_kl, until_one_stops, *, layer, hp):
  """Steps every active slot until all stop, or, with `until_one_stops`
  (requests are waiting), until one does.

  The step is `_optimize`'s, per slot: Adam's bias correction counts the
  slot's own steps, and history is written at the slot's own step.

  Returns:
    (the new `slots`, the number of steps run).
  """
  with precision.compute_dtype(hp.compute_dtype):
    rows = data["rows"]
    cache = dict(layers=rows["layers"], pos=rows["pos"], index=data["index"])
    stacked = (None if blocks is None
               else dict(params=blocks, cache=data["stacked"]))
    _, losses = _value_fns(
        config, params, blocks, stacked, cache, rows["hidden"],
        rows["suffix_mask"], rows["target_pos"], rows["target_ids"],
        rows["target_mask"], row_request, row_weight, row_is_kl,
        data["init_norm"], layer, hp)
    grad_fn = jax.value_and_grad(
        lambda delta: losses(delta, rows["kl_init"]), has_aux=True)
    update = jax.vmap(optax.adam(hp.lr).update)
    max_norm_C = hp.clamp_norm_factor * data["init_norm"]
    step_S = jnp.arange(hp.steps)
    num_started = jnp.sum(slots["active"])

    def cond(carry):
      _, s = carry
      num_active = jnp.sum(s["active"])
      return (num_active > 0) & ~(until_one_stops &
                                  (num_active < num_started))

    def body(carry):
      n, s = carry
      active = s["active"]
      (_, (total, nll)), grad = grad_fn(s["delta"])
      history = jnp.where(active[:, None] &
                          (step_S[None, :] == s["steps"][:, None]),
                          nll[:, None], s["history"])
      watched = nll if hp.stop_on == "nll" else total
      # Active slots have stepped `steps` times: `_optimize`'s `step`.
      still = active & (watched >= hp.stop_loss) & (s["steps"] < hp.steps - 1)
      updates, new_opt = update(grad, s["opt"], s["delta"])
      new_delta = s["delta"] + updates
      norm = jnp.linalg.norm(new_delta, axis=-1, keepdims=True)
      new_delta = new_delta * jnp.minimum(1.0, max_norm_C[:, None] /
                                          jnp.maximum(norm, 1e-12))
      keep = lambda new, old: jnp.where(
          still.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      return n + 1, dict(
          delta=keep(new_delta, s["delta"]),
          opt=jax.tree.map(keep, new_opt, s["opt"]), active=still,
          loss=jnp.where(active, total, s["loss"]),
          nll=jnp.where(active, nll, s["nll"]),
          steps=s["steps"] + still.astype(jnp.int32), history=history)

    n, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), slots))
  return slots, n


def _run_pool(prepare, segment, chunks, num_slots, hp, done):
  """Runs the requests of `chunks` through one pool of `num_slots` slots.

  Args:
    prepare: request indices (at most `num_slots`) -> `_prepare_slots`'
      output for them (padded to `num_slots` requests).
    segment: `(data, slots, until_one_stops) -> (slots, steps run)`.
    chunks: lists of request indices, in order; all but the last full.
    num_slots: C.
    hp: `ValueHParams`.
    done: called as `done(request index, {delta, loss, nll, steps,
      nll_history})` when a request stops.

  Returns:
    (segments run, slot-steps run).
  """
  incoming = prepare(chunks[0])
  data = {k: incoming[k] for k in ("rows", "stacked", "index", "init_norm")}
  slots = _empty_slots(num_slots, incoming["v0"].shape[-1],
                       data["rows"]["hidden"].dtype, hp.steps, hp.lr,
                       len(chunks[0]))
  held = list(chunks[0]) + [None] * (num_slots - len(chunks[0]))
  later = [i for part in chunks[1:] for i in part]  # not yet prepared
  queue, buffer = [], None  # a prepared chunk's unused (position, request)
  segments = slot_steps = 0
  while True:
    slots, n = segment(data, slots, bool(queue or later))
    got = jax.device_get({k: v for k, v in slots.items() if k != "opt"})
    segments += 1
    slot_steps += num_slots * int(n)
    for s, i in enumerate(held):
      if i is not None and not got["active"][s]:
        done(i, dict(delta=got["delta"][s], loss=got["loss"][s],
                     nll=got["nll"][s], steps=got["steps"][s],
                     nll_history=got["history"][s]))
        held[s] = None
    free = [s for s, i in enumerate(held) if i is None]
    if not (queue or later) and len(free) == num_slots:
      return segments, slot_steps
    while free and (queue or later):
      if not queue:
        part, later = later[:num_slots], later[num_slots:]
        buffer, queue = prepare(part), list(enumerate(part))
      taken, queue = queue[:len(free)], queue[len(free):]
      dest = np.full((num_slots,), num_slots, np.int32)
      for (j, i), s in zip(taken, free):
        dest[j], held[s] = s, i
      data, slots = _refill(data, slots, buffer, jnp.asarray(dest))
      free = free[len(taken):]


def value_rows(model, requests, templates, kl_prompts=KL_PROMPTS):
  """Rows of the v* batch: every template with its target, then KL prompts.

  Returns:
    (rows for `make_layout`, row_request, row_weight, row_is_kl, index of
    each request's first (plain-template) row).

  Raises:
    InputError: a target or subject that tokenizes to nothing, or a row
      longer than the model's context (checked before any model work).
  """
  limit = model.config.max_position_embeddings
  rows, row_request, row_weight, row_is_kl, first = [], [], [], [], []
  for r, request in enumerate(requests):
    target = encode_target(model.tokenizer, request)
    first.append(len(rows))
    for template in templates:
      ids, last = tokenize_around_subject(
          model.tokenizer, fill(template, request), request.subject)
      if len(ids) + len(target) > limit:
        raise errors.InputError(
            f"request {request.case_id!r}: the prompt in context "
            f"{template!r:.60} and the target are {len(ids) + len(target)} "
            f"tokens; the model takes {limit} (max_position_embeddings).")
      rows.append((ids, last, target))
      row_request.append(r)
      row_weight.append(1.0 / len(templates))
      row_is_kl.append(False)
    for kl_prompt in kl_prompts:
      ids, last = tokenize_around_subject(model.tokenizer, kl_prompt,
                                          request.subject)
      rows.append((ids[:last + 1], last, []))
      row_request.append(r)
      row_weight.append(0.0)
      row_is_kl.append(True)
  return rows, row_request, row_weight, row_is_kl, first


def optimize_values(model, params, requests, templates, *, layer: int,
                    site_kind: str, hp: ValueHParams, chunk: int = 8,
                    continuous: bool = True):
  """Optimises one delta per request at the subject's last token.

  The delta is added to the residual stream after block `layer`; with
  `site_kind="mlp/value"` (ROME) its scale reference v0 is the MLP output
  there, with `"resid"` (MEMIT) the residual stream itself.

  Requests are sorted by shape bucket and cut into chunks of `chunk`. Without
  `continuous`, each chunk runs one jitted loop until its slowest request
  stops. With it, consecutive chunks of one padded shape share a pool of
  `chunk` request slots, and a slot whose request stops takes the next
  waiting request (`_run_pool`): the same result per request (each request's
  loss reads only its own rows, and each slot keeps its own Adam state and
  step count), in fewer slot-steps.

  Args:
    model: the `LanguageModel` (config, tokenizer).
    params: the parameters to edit.
    requests: validated `Request`s.
    templates: context templates (`"{}"` first).
    layer: the block after which the delta is added.
    site_kind: "mlp/value" or "resid".
    hp: `ValueHParams`.
    chunk: requests per jitted batch, or slots of the pool (the row count is
      fixed, so chunks and pools of a shape share one compilation).
    continuous: refill finished slots (continuous batching) instead of
      running chunk after chunk.

  Returns:
    dict with `delta` `[R, D]`, `v0` `[R, D]` (the unedited site value of
    each request's plain prompt), `steps` `[R]`, `loss` `[R]`, `nll` `[R]`,
    `nll_history` `[R, steps]`, and the work done: `segments` (jitted loops
    run), `slot_steps` (request slots × loop steps run) and
    `chunked_slot_steps` (what chunk after chunk runs).
  """
  config = model.config
  # Scanned: the blocks above `layer` stacked once (in the compute dtype),
  # only the blocks up to `layer` rounded in place. Unrolled: every kernel.
  blocks = None
  if (hp.scan_layers and not adapters_lib.has_adapters(params)
      and layer + 1 < config.num_layers):  # (no blocks above the last)
    blocks = stacked_blocks(config, params, start=layer + 1,
                            compute_dtype=hp.compute_dtype)
    params = precision.cast_kernels(params, hp.compute_dtype, max_layer=layer)
  else:
    params = precision.cast_kernels(params, hp.compute_dtype)
  per_request = [value_rows(model, [r], templates) for r in requests]
  # Requests with similar suffix and target lengths share a chunk (less
  # padding per step, fewer shapes to compile); one prefix length for all.
  def shape(ids):
    rows = [row for i in ids for row in per_request[i][0]]
    return (suffix_bucket(max(len(i) - s + max(len(t) - 1, 0)
                              for i, s, t in rows)),
            target_bucket(max(max(len(t), 1) for _, _, t in rows)))
  order = sorted(range(len(requests)), key=lambda i: shape([i]))
  prefix_len = lm.bucket(max(s for rows, *_ in per_request
                             for _, s, _ in rows), PREFIX_MULTIPLE)
  # Every chunk has `num_slots` requests: the last one is padded with copies
  # of its last request (results dropped).
  num_slots = min(chunk, len(requests))
  chunks = [order[i:i + chunk] for i in range(0, len(requests), chunk)]

  def chunk_rows(part):
    padded = part + [part[-1]] * (num_slots - len(part))
    rows, row_request, row_weight, row_is_kl = [], [], [], []
    for k, i in enumerate(padded):
      r_rows, _, r_weight, r_is_kl, _ = per_request[i]
      rows += r_rows
      row_request += [k] * len(r_rows)
      row_weight += r_weight
      row_is_kl += r_is_kl
    return (make_layout(rows, prefix_len=prefix_len),
            jnp.asarray(row_request, jnp.int32),
            jnp.asarray(row_weight, jnp.float32), jnp.asarray(row_is_kl))

  results = {k: [None] * len(requests)
             for k in ("delta", "v0", "steps", "loss", "nll", "nll_history")}
  bar = None
  if len(chunks) > 1:
    bar = progress.bar(total=len(requests), unit="request", leave=False,
                       desc=f"v* ({len(requests)} requests)")

  def done(i, got):
    for key, value in got.items():
      results[key][i] = np.asarray(value)
    if bar is not None:
      bar.update(1)

  def run_chunk(part):
    layout, row_request, row_weight, row_is_kl = chunk_rows(part)
    cache, hidden, site_value = _prepare(
        config, params, blocks, jnp.asarray(layout.prefix_tokens),
        jnp.asarray(layout.prefix_mask), jnp.asarray(layout.suffix_tokens),
        jnp.asarray(layout.suffix_mask), layer=layer, site_kind=site_kind,
        compute_dtype=hp.compute_dtype)
    v0 = site_value[::len(row_request) // num_slots]
    delta, steps, loss, nll, history = _optimize(
        config, params, blocks, cache, hidden,
        jnp.asarray(layout.suffix_mask),
        jnp.asarray(layout.target_pos), jnp.asarray(layout.target_ids),
        jnp.asarray(layout.target_mask), row_request, row_weight, row_is_kl,
        jnp.linalg.norm(v0, axis=-1), layer=layer, hp=hp)
    got = jax.device_get(dict(v0=v0, delta=delta, loss=loss, nll=nll,
                              steps=steps, nll_history=history))
    for k, i in enumerate(part):
      done(i, {key: value[k] for key, value in got.items()})
    return num_slots * (int(got["steps"].max()) + 1)

  def prepare(part):
    layout, row_request, _, _ = chunk_rows(part)
    incoming = _prepare_slots(
        config, params, blocks, dataclasses.asdict(layout), row_request,
        layer=layer, site_kind=site_kind, hp=hp,
        rows_per_request=len(row_request) // num_slots)
    prepared_v0.append((part, incoming["v0"]))  # read at the end: no sync
    return incoming

  # Consecutive chunks of one padded shape form a pool: each request is
  # padded as chunk after chunk pads it.
  pools = []
  for part in chunks:
    if pools and shape(pools[-1][-1]) == shape(part):
      pools[-1].append(part)
    else:
      pools.append([part])
  segments = slot_steps = 0
  prepared_v0 = []
  for pool in pools:
    if not continuous or len(pool) == 1:
      for part in pool:
        slot_steps += run_chunk(part)
        segments += 1
      continue
    pattern = chunk_rows(pool[0])[1:]  # the same rows in every slot
    segment = lambda data, slots, waiting, pattern=pattern: _segment(
        config, params, blocks, data, slots, *pattern, jnp.asarray(waiting),
        layer=layer, hp=hp)
    got = _run_pool(prepare, segment, pool, num_slots, hp, done)
    segments += got[0]
    slot_steps += got[1]
  if bar is not None:
    bar.close()
  for part, v0 in prepared_v0:
    v0 = np.asarray(v0)
    for k, i in enumerate(part):
      results["v0"][i] = v0[k]
  out = {k: np.stack(v) for k, v in results.items()}
  # Chunk after chunk: each chunk's loop runs its slowest request's passes
  # (a request stopped after `steps` updates made `steps` + 1 passes).
  out.update(segments=segments, slot_steps=slot_steps,
             chunked_slot_steps=sum(
                 num_slots * (1 + max(int(out["steps"][i]) for i in part))
                 for part in chunks))
  return out
