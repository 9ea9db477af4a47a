"""T-Patcher: patch neurons beside one FFN (Huang et al., ICLR 2023,
"Transformer-Patcher: One Mistake Worth One Neuron").

The weights never change. Each edit adds one or a few neurons to one MLP of
the model, held as an adapter in `params["adapters"]` at the block's MLP
output (`layer/{l}/mlp/value`):

  out = x + act(h @ K^T + b) @ V          (the paper's patch: one more
                                          FFN neuron per key/value pair)

where `h` is the MLP's input (`layer/{l}/mlp/in`, after the block's norm),
each row of K (with its bias in b) is a neuron's key and each row of V its
value. Neurons live in capacity-padded arrays with an `active` mask; the
capacity doubles when full (as GRACE's codebook), so sequential edits
recompile logarithmically often.

The activation is ReLU (the paper uses the host FFN's activation: GELU in BART
and BERT). SmolLM2's MLP is SwiGLU, whose gate (SiLU) leaks a negative output
for negative inputs; with ReLU a neuron below zero adds exactly 0, so a prompt
on which no patch neuron fires runs bit-for-bit as the unedited model.

An edit, for a decoder LM with prompt `p` and target `t`:
  - the positions: the prompt's last token and the target's tokens (teacher
    forced) each predict one target token; as the paper does for seq2seq
    (one neuron per wrongly predicted target token), one neuron is added per
    position whose target token is not the greedy one (at most
    `max_neurons`; at the position of the largest NLL when all are greedy
    but the target is still too unlikely);
  - a neuron's key starts at `key_scale · margin_pos · h/‖h‖²` with bias
    `margin_pos · (1 - key_scale)`, h its position's MLP input: its initial
    activation there is exactly `margin_pos` (the reference's h/‖h‖² for
    `key_scale=1`, margin 1); the value starts at 0;
  - keys, biases and values are trained with Adam (`lr`) on
      L = L_edit + act_weight · L_act + memory_weight · L_mem
    (the paper's edit, activation and memory losses; reference code
    `src/models/patch.py`, `scripts/T-patch.py`)
    L_edit: the target's mean NLL (teacher forced, every target token);
    L_act = mean_i relu(margin_pos - a_i(h_i)): each neuron fires on its own
      position at or above `margin_pos`;
    L_mem = mean over violations of relu(a_i(m) - margin_neg) for every
      memory activation m: neurons stay below a negative margin on unrelated
      inputs (the reference's "margin" loss, averaged over violators so that a
      few violations among thousands of memory rows still pull).
    Training stops when every target token is greedy, the NLL is at most
    `stop_nll` and both margins hold;
  - still failing after `steps`, another neuron is added at the first
    position that is wrong (up to `max_neurons`) and training continues.

The memory (the editor state) is what L_mem keeps neurons silent on. The
reference builds it from its task's training inputs (zsRE questions, FEVER
claims), which hold the same relations about other subjects. Here `init`
reads `memory_size` MLP-input activations of layer l over the bundled
WikiText-2 and, with `memory_task` (default the bundled CounterFact training
split: other cases than the edit split's), the activations where that
task's prompts predict their answers. WikiText alone is not enough: a
neighbourhood prompt (same relation, another subject) lies much closer to
the edit in activation space than any WikiText position. On the first 50
CounterFact edit records (docs/results/tpatcher_sweep.json), with WikiText
alone the patch fired on 56% of the neighbourhood prompts (neighbourhood
score 70 -> 58); with 1,000 training records (2,346 rows) added it fired on
none (70 kept). Every edit then appends its own input's activations (all
its prompt and target positions, as the reference adds each past edit's
hidden states), so later neurons stay silent on earlier edits. The memory
is a padded array whose capacity doubles when full (~10-20 rows per
CounterFact edit: 1,000 edits add ~15k rows, 35 MB).

Removing an edit (`remove`) zeroes and deactivates its neurons: a removed
neuron contributes exactly 0, so removing the last edit gives back the
earlier model's outputs bit for bit (neurons of later edits, trained on the
model that still had it, stay as they are). The memory keeps the removed
edit's activations (it only makes later neurons more conservative).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors
from keditjax.editors import base
from keditjax.models import adapters as adapters_lib
from keditjax.models import lm
from keditjax.models import sites as sites_lib

KIND = "tpatcher"
ACTIVATIONS = ("relu", "gelu")
_MEMORY_SEQ_LEN = 128  # WikiText rows (as `keditjax.stats`' key statistics)


@dataclasses.dataclass(frozen=True)
class TPatcherHParams:
  """T-Patcher hyper-parameters (the reference's names in brackets).

  Attributes:
    layer: the block whose MLP gets the patch; the paper patches the last
      FFN (29 is SmolLM2-135M's last block).
    activation: the patch neurons' activation, "relu" (default: a silent
      neuron adds exactly 0; module docstring) or "gelu".
    max_neurons: most neurons per edit [max_add_neuron_num = 5].
    margin_pos: a neuron's activation on its edit position must reach this
      (a hinge; the reference's act_margin_val = 0 sits under an exp loss
      that keeps pushing up from its initial activation, 1).
    margin_neg: its activation on every memory row must stay below this
      (negative) [margin_val2 = -3].
    act_weight: L_act's weight [alc = 1].
    memory_weight: L_mem's weight [mlc = 10 for zsRE].
    key_scale: the key starts at key_scale × margin_pos × h/‖h‖² with bias
      margin_pos × (1 - key_scale): 1 is the reference; larger values keep
      the initial activation at the margin on h but make it fall faster
      away from h (a sharper neuron).
    lr: Adam's learning rate [1e-2]; at 3e-2 the first 50 CounterFact
      edits score the same and need 1.2 rather than 1.5 neurons per edit and
      half the time (docs/results/tpatcher_sweep.json).
    steps: most Adam steps per training round (one round per added neuron).
    stop_nll: training stops once every target token is greedy, the target's
      mean NLL is at most this and both margins hold.
    memory_size: WikiText-2 token positions in the initial memory (the
      reference uses its task's training inputs; 4096 positions are 32 rows
      of 128 tokens).
    memory_task: a `keditjax.data` dataset (CounterFact or zsRE layout)
      whose training prompts join the memory ("" for none): the paper's
      memory is its task's training inputs, which hold the same relations
      about other subjects; WikiText alone holds none, and a neuron then
      fires on neighbourhood prompts (see `task_memory`). Use
      "zsre-train" when editing zsRE-style questions.
    memory_task_records: records of `memory_task` read (2 prompts each).
    capacity: initial neuron slots; doubles when full.
  """
  layer: int = 29
  activation: str = "relu"
  max_neurons: int = 5
  margin_pos: float = 1.0
  margin_neg: float = -3.0
  act_weight: float = 1.0
  memory_weight: float = 10.0
  key_scale: float = 1.0
  lr: float = 3e-2
  steps: int = 200
  stop_nll: float = 0.1
  memory_size: int = 4096
  memory_task: str = "counterfact-train"
  memory_task_records: int = 1000
  capacity: int = 16

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise errors.ConfigError(
          f"T-Patcher activation={self.activation!r}; use one of "
          f"{ACTIVATIONS}.")
    if not self.margin_pos > 0 or not self.margin_neg < 0:
      raise errors.ConfigError(
          f"T-Patcher needs margin_pos > 0 and margin_neg < 0; got "
          f"margin_pos={self.margin_pos}, margin_neg={self.margin_neg}.")
    if not self.key_scale > 0:
      raise errors.ConfigError(
          f"T-Patcher key_scale={self.key_scale} must be > 0.")
    if self.act_weight < 0 or self.memory_weight < 0:
      raise errors.ConfigError(
          f"T-Patcher act_weight={self.act_weight} and memory_weight="
          f"{self.memory_weight} must be >= 0.")
    if (self.max_neurons < 1 or self.steps < 1 or not self.lr > 0
        or self.capacity < 1 or self.memory_size < 1 or self.stop_nll < 0):
      raise errors.ConfigError(
          f"T-Patcher needs max_neurons >= 1, steps >= 1, lr > 0, "
          f"capacity >= 1, memory_size >= 1, stop_nll >= 0; got "
          f"{self.max_neurons}, {self.steps}, {self.lr}, {self.capacity}, "
          f"{self.memory_size}, {self.stop_nll}.")
    if not isinstance(self.memory_task, str) or self.memory_task_records < 0:
      raise errors.ConfigError(
          f"T-Patcher memory_task={self.memory_task!r} must be a dataset name "
          f"or path (\"\" for none) and memory_task_records="
          f"{self.memory_task_records} >= 0.")


# -- the adapter ------------------------------------------------------------

def _activate(a, activation: str):
  return jax.nn.relu(a) if activation == "relu" else jax.nn.gelu(a)


def patch_neurons(params, x_BxLxD, inputs, *, activation="relu"):
  """T-Patcher's forward rule: `x + act(h K^T + b) V` over the active
  neurons (the paper's patch; h is the MLP input `mlp/in`). Position-wise,
  so KV-cached generation equals a full forward pass.

  Args:
    params: {"keys": [C, H], "bias": [C], "values": [C, D], "active": [C]
      (1 live, 0 free or removed)}.
    x_BxLxD: the MLP's output.
    inputs: {"mlp/in": the MLP's input [B, L, H]}.
    activation: "relu" or "gelu".

  Returns:
    The patched MLP output, in x's dtype.
  """
  h_BxLxH = inputs["mlp/in"].astype(jnp.float32)
  a_BxLxC = (jnp.einsum("blh,ch->blc", h_BxLxH,
                        params["keys"].astype(jnp.float32))
             + params["bias"].astype(jnp.float32))
  z_BxLxC = _activate(a_BxLxC, activation) * params["active"].astype(
      jnp.float32)
  delta_BxLxD = jnp.einsum("blc,cd->bld", z_BxLxC,
                           params["values"].astype(jnp.float32))
  return (x_BxLxD.astype(jnp.float32) + delta_BxLxD).astype(x_BxLxD.dtype)


def empty_patch(capacity: int, in_dim: int, out_dim: int,
                activation: str = "relu") -> adapters_lib.Adapter:
  """A T-Patcher adapter with `capacity` free neuron slots.

  Args:
    capacity: neuron slots.
    in_dim: the MLP input's width (the model's hidden size).
    out_dim: the MLP output's width (the hidden size too).
    activation: "relu" or "gelu".
  """
  if activation not in ACTIVATIONS:
    raise errors.ConfigError(
        f"T-Patcher activation={activation!r}; use one of {ACTIVATIONS}.")
  return adapters_lib.Adapter(
      params={"keys": jnp.zeros((capacity, in_dim), jnp.float32),
              "bias": jnp.zeros((capacity,), jnp.float32),
              "values": jnp.zeros((capacity, out_dim), jnp.float32),
              "active": jnp.zeros((capacity,), jnp.int32)},
      fn=patch_neurons, inputs=("mlp/in",),
      options=(("activation", activation),), kind=KIND)


def site(hparams: TPatcherHParams) -> str:
  """The patch's site, `layer/{l}/mlp/value`."""
  return f"layer/{hparams.layer}/mlp/value"


def patch(params, hparams):
  """(index in the site's adapter stack, the T-Patcher adapter) or (None, None)."""
  return adapters_lib.find(params, site(hparams), KIND)


def size(params, hparams: TPatcherHParams) -> int:
  """Live patch neurons."""
  _, a = patch(params, hparams)
  return 0 if a is None else int(np.sum(np.asarray(a.params["active"])))








# -- the state: a memory of MLP inputs ----------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TPatcherState:
  """The memory L_mem keeps neurons silent on, and an edit count.

  Attributes:
    memory: [M, H] float32 MLP inputs of the patched layer (rows beyond
      `memory_count` are padding; M doubles when full).
    memory_count: the number of real rows.
    num_edits: edits applied so far.
    layer: the layer the memory was read at (static).
  """
  memory: jax.Array
  memory_count: jax.Array
  num_edits: jax.Array
  layer: int = dataclasses.field(default=0, metadata=dict(static=True))


def _append_memory(state: TPatcherState, rows_NxH: np.ndarray, edits: int):
  """`state` with `rows` appended to its memory (capacity doubling)."""
  memory = np.asarray(state.memory)
  count = int(state.memory_count)
  needed = count + len(rows_NxH)
  cap = memory.shape[0]
  if needed > cap:
    while cap < needed:
      cap *= 2
    memory = np.concatenate(
        [memory, np.zeros((cap - memory.shape[0], memory.shape[1]),
                          memory.dtype)])
  else:
    memory = memory.copy()
  memory[count:needed] = rows_NxH
  return TPatcherState(memory=jnp.asarray(memory),
                       memory_count=jnp.int32(needed),
                       num_edits=jnp.int32(edits), layer=state.layer)


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _mlp_inputs(config, params, tokens_BxL, mask_BxL, *, layer):
  """`layer/{layer}/mlp/in` at every position: [B, L, H]."""
  name = f"layer/{layer}/mlp/in"
  _, out, _ = lm.run(config, params, tokens_BxL, attention_mask=mask_BxL,
                     stop_layer=layer + 1, sites=sites_lib.capture(name))
  return out[name]


def corpus_memory(model, params, layer: int, num_positions: int,
                  corpus=None, batch_size: int = 8) -> np.ndarray:
  """MLP inputs of `layer` at `num_positions` token positions of a corpus.

  Args:
    model: the language model (its tokenizer packs the corpus).
    params: the weights to read the activations with.
    layer: the block.
    num_positions: how many positions (rows) to return, at most.
    corpus: a `keditjax.stats` corpus argument (None: bundled WikiText-2).
    batch_size: rows of `_MEMORY_SEQ_LEN` tokens per forward pass.

  Returns:
    float32 [N, H], N <= num_positions (fewer only if the corpus is short).
  """
  from keditjax import stats  # the one corpus reader
  rows = stats.packed_rows(model.tokenizer, stats.corpus_texts(corpus),
                           _MEMORY_SEQ_LEN, num_tokens=num_positions)
  out, got = [], 0
  while got < num_positions:
    block = list(itertools.islice(rows, batch_size))
    if not block:
      break
    tokens = np.zeros((batch_size, _MEMORY_SEQ_LEN), np.int32)
    mask = np.zeros((batch_size, _MEMORY_SEQ_LEN), np.int32)
    for i, row in enumerate(block):
      tokens[i, :len(row)] = row
      mask[i, :len(row)] = 1
    h = np.asarray(_mlp_inputs(model.config, params, jnp.asarray(tokens),
                               jnp.asarray(mask), layer=layer), np.float32)
    real = h[mask > 0]
    out.append(real)
    got += len(real)
  if not out:
    raise errors.InputError("the memory corpus has no text.")
  return np.concatenate(out)[:num_positions]


# Fields of the bundled task layouts: (prompt, its true continuation) pairs.
# Paraphrases are left out: they are longer (CounterFact's carry a random
# prefix) and ask what the prompt asks, so they add cost, not coverage.
_TASK_FIELDS = (
    (("prompt", "ground_truth"),
     ("locality_prompt", "locality_ground_truth")),           # CounterFact
    (("src", "answers"), ("loc", "loc_ans")),                  # zsRE
)


def _task_pairs(records) -> list[tuple[str, str]]:
  """(prompt, true continuation) pairs of CounterFact or zsRE records."""
  pairs = []
  for i, record in enumerate(records):
    layout = next((f for f in _TASK_FIELDS if f[0][0] in record), None)
    if layout is None:
      raise errors.InputError(
          f"memory task record {i} has neither a CounterFact 'prompt' nor a "
          f"zsRE 'src' field (keys: {sorted(record)[:8]}).")
    for prompt, answer in layout:
      p, a = record.get(prompt), record.get(answer)
      if isinstance(a, list):
        a = a[0] if a else None
      if isinstance(p, str) and p.strip() and isinstance(a, str) and a.strip():
        pairs.append((p, a if a.startswith(" ") else " " + a))
  return pairs


def task_memory(model, params, layer: int, dataset: str, num_records: int,
                batch_size: int = 64) -> np.ndarray:
  """MLP inputs of `layer` where a task's training prompts predict their
  answers: each prompt's last token and its true answer's tokens (teacher
  forced), for the prompt and the locality prompt of the first
  `num_records` records. As in the paper, whose memory holds the task's
  training inputs, a patch then learns to stay silent on the same questions
  about other subjects.

  Args:
    model, params: the model and the weights to read activations with.
    layer: the block.
    dataset: a `keditjax.data` dataset name or path (CounterFact or zsRE
      layout, e.g. "counterfact-train", "zsre-train").
    num_records: records to read.
    batch_size: rows per forward pass.

  Returns:
    float32 [N, H].
  """
  from keditjax import data  # the one data resolver
  pairs = _task_pairs(data.read_records(dataset)[:num_records])
  if not pairs:
    raise errors.InputError(f"memory task {dataset!r} has no prompts.")
  encoded = sorted(((model.encode(p), model.encode(a)) for p, a in pairs),
                   key=lambda pa: len(pa[0]) + len(pa[1]))
  out = []
  # Sorted by length and padded to multiples of 8: little padding, few
  # compiled shapes.
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    length = lm.bucket(max(len(p) + len(a) for p, a in chunk), 8)
    tokens = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, (p, a) in enumerate(chunk):
      tokens[row, :len(p) + len(a)] = p + a
      mask[row, :len(p) + len(a)] = 1
    h = np.asarray(_mlp_inputs(model.config, params, jnp.asarray(tokens),
                               jnp.asarray(mask), layer=layer), np.float32)
    for row, (p, a) in enumerate(chunk):
      out.append(h[row, len(p) - 1:len(p) + len(a) - 1])
  return np.concatenate(out)


# -- one edit's inputs and the neuron training ---------------------------------

def _encode(model, request):
  return base.encode_request(model, request, "T-Patcher")


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _prefix(config, params, tokens, mask, where, targets, *, layer):
  """The residual entering `layer`, the MLP input of `layer` at every
  position, and whether each target token is greedy (and its NLL) under
  `params`."""
  name = f"layer/{layer}/mlp/in"
  hidden, _, _ = lm.run(config, params, tokens, attention_mask=mask,
                        stop_layer=layer)
  logits, out, _ = lm.run(config, params, hidden=hidden, start_layer=layer,
                          attention_mask=mask, logit_positions=where,
                          sites=sites_lib.capture(name))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll_1xT = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return hidden, out[name], jnp.argmax(logits, -1) == targets, nll_1xT


def _edit_inputs(model, params, layer, prompt, target):
  """The edit's padded layout and its activations under `params`."""
  ids = prompt + target
  layout = base.edit_layout(model, prompt, target)
  tokens, mask, where, targets, tmask = (
      layout[k] for k in ("tokens", "mask", "where", "targets", "tmask"))
  hidden, h_in, greedy, nll = _prefix(
      model.config, params, jnp.asarray(tokens), jnp.asarray(mask),
      jnp.asarray(where), jnp.asarray(targets), layer=layer)
  n = len(target)
  return dict(hidden=hidden, mask=jnp.asarray(mask), where=jnp.asarray(where),
              targets=jnp.asarray(targets), tmask=jnp.asarray(tmask),
              h_in=np.asarray(h_in[0, :len(ids)], np.float32),
              positions=where[0, :n], greedy=np.asarray(greedy[0, :n]),
              nll=np.asarray(nll[0, :n]))


def _loss_terms(trainee, h_NxH, on_N, memory_MxH, valid_M, *, activation_margin,
                margin_neg):
  """L_act and L_mem (module docstring) and the margins' worst cases."""
  a_N = jnp.sum(h_NxH * trainee["keys"], -1) + trainee["bias"]
  short_N = jax.nn.relu(activation_margin - a_N) * on_N
  act = jnp.sum(short_N) / jnp.maximum(jnp.sum(on_N), 1.0)
  a_MxN = memory_MxH @ trainee["keys"].T + trainee["bias"]
  over_MxN = jax.nn.relu(a_MxN - margin_neg) * (valid_M[:, None] * on_N[None])
  mem = jnp.sum(over_MxN) / jnp.maximum(jnp.sum(over_MxN > 0), 1.0)
  a_min = jnp.min(jnp.where(on_N > 0, a_N, jnp.inf))
  m_max = jnp.max(jnp.where((valid_M[:, None] * on_N[None]) > 0, a_MxN,
                            -jnp.inf))
  return act, mem, a_min, m_max


@functools.partial(jax.jit, static_argnames=(
    "config", "layer", "activation", "steps", "lr", "stop_nll", "margin_pos",
    "margin_neg", "act_weight", "memory_weight"))
def _train(config, params, trainee, on_N, h_NxH, memory_MxH, valid_M,
           hidden_1xLxD, mask_1xL, where_1xT, targets_1xT, tmask_1xT, *,
           layer: int, activation: str, steps: int, lr: float,
           stop_nll: float, margin_pos: float, margin_neg: float,
           act_weight: float, memory_weight: float):
  """Adam on the new neurons' keys, biases and values for L (module
  docstring), stopping once the target is greedy, its NLL at most
  `stop_nll` and both margins hold.

  Returns:
    (trainee, steps taken, {"nll", "greedy_T", "act_min", "memory_max",
    "done"}).
  """
  name = f"layer/{layer}/mlp/value"
  tx = optax.adam(lr)
  on_f = on_N.astype(jnp.float32)
  valid_f = valid_M.astype(jnp.float32)
  terms = functools.partial(_loss_terms, h_NxH=h_NxH, on_N=on_f,
                            memory_MxH=memory_MxH, valid_M=valid_f,
                            activation_margin=margin_pos,
                            margin_neg=margin_neg)

  def loss_fn(t):
    # The new neurons run as one more adapter after the existing patch, so
    # training sees the model exactly as inference will.
    new = adapters_lib.Adapter(dict(t, active=on_N), patch_neurons,
                               inputs=("mlp/in",),
                               options=(("activation", activation),),
                               kind="tpatcher-training")
    edited = adapters_lib.with_adapters(
        params, name, adapters_lib.at(params, name) + (new,))
    logits, _, _ = lm.run(config, edited, hidden=hidden_1xLxD,
                          start_layer=layer, attention_mask=mask_1xL,
                          logit_positions=where_1xT)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp_1xT = jnp.take_along_axis(logp, targets_1xT[..., None], -1)[..., 0]
    nll = -jnp.sum(lp_1xT * tmask_1xT) / jnp.sum(tmask_1xT)
    greedy_1xT = (jnp.argmax(logits, -1) == targets_1xT) | (tmask_1xT == 0)
    act, mem, a_min, m_max = terms(t)
    done = jnp.all(greedy_1xT) & (nll <= stop_nll) & (act <= 0) & (mem <= 0)
    loss = nll + act_weight * act + memory_weight * mem
    return loss, dict(nll=nll, greedy_T=greedy_1xT[0], act_min=a_min,
                      memory_max=m_max, done=done)

  def cond(carry):
    _, _, i, done = carry
    return (i < steps) & ~done

  def body(carry):
    t, opt, i, _ = carry
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(t)
    # Free trainee slots stay zero (their gradients are zero anyway).
    g = {k: v * on_f.reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in g.items()}
    updates, new_opt = tx.update(g, opt, t)
    new_t = optax.apply_updates(t, updates)
    keep = aux["done"]  # already done: keep these neurons (the early stop)
    t = jax.tree.map(lambda a, b: jnp.where(keep, a, b), t, new_t)
    opt = jax.tree.map(lambda a, b: jnp.where(keep, a, b), opt, new_opt)
    return t, opt, i + jnp.where(keep, 0, 1), keep

  init = (trainee, tx.init(trainee), jnp.int32(0), jnp.bool_(False))
  trainee, _, taken, _ = jax.lax.while_loop(cond, body, init)
  _, aux = loss_fn(trainee)
  return trainee, taken, aux


def _init_neuron(trainee, slot, h_H, hparams):
  """Trainee slot `slot` keyed on h: activation margin_pos at h."""
  key = (hparams.key_scale * hparams.margin_pos * h_H
         / max(float(np.dot(h_H, h_H)), 1e-12))
  trainee["keys"][slot] = key
  trainee["bias"][slot] = hparams.margin_pos * (1.0 - hparams.key_scale)
  trainee["values"][slot] = 0.0


def _fit(train, params, state, x, hparams, width):
  """The new neurons of one edit: keyed where the target is wrong, trained,
  and, still wrong after `steps`, one more neuron at a time (module
  docstring).

  Returns:
    (trainee {"keys", "bias", "values"} numpy arrays with `max_neurons`
    slots, on [max_neurons] (1 for the slots used, a prefix), Adam steps
    taken in all, the last round's diagnostics or None when no neuron was
    needed).
  """
  n_max = hparams.max_neurons
  positions, wrong = x["positions"], np.flatnonzero(~x["greedy"])
  if wrong.size:
    chosen = [int(t) for t in wrong[:n_max]]
  elif float(np.mean(x["nll"])) > hparams.stop_nll:
    chosen = [int(np.argmax(x["nll"]))]
  else:
    chosen = []  # already the model's answer: nothing to patch
  trainee = {"keys": np.zeros((n_max, width), np.float32),
             "bias": np.zeros((n_max,), np.float32),
             "values": np.zeros((n_max, width), np.float32)}
  h_pos = np.zeros((n_max, width), np.float32)
  on = np.zeros((n_max,), np.int32)

  def add_neuron(t):
    slot = int(on.sum())
    h_pos[slot] = x["h_in"][positions[t]]
    _init_neuron(trainee, slot, h_pos[slot], hparams)
    on[slot] = 1

  for t in chosen:
    add_neuron(t)
  taken_all, aux = 0, None
  valid = np.arange(state.memory.shape[0]) < int(state.memory_count)
  while on.sum():
    trained, taken, aux = train(
        params, jax.tree.map(jnp.asarray, trainee), jnp.asarray(on),
        jnp.asarray(h_pos), state.memory, jnp.asarray(valid), x["hidden"],
        x["mask"], x["where"], x["targets"], x["tmask"])
    trainee = {k: np.array(v) for k, v in trained.items()}
    taken_all += int(taken)
    still = np.flatnonzero(~np.asarray(aux["greedy_T"])[:len(positions)])
    if bool(aux["done"]) or not still.size or on.sum() >= n_max:
      break
    add_neuron(int(still[0]))  # one more neuron where it is still wrong
  return trainee, on, taken_all, aux


# -- the editor ----------------------------------------------------------------

def tpatcher(hparams: TPatcherHParams = TPatcherHParams()):
  """The T-Patcher editor (module docstring)."""

  def check_model(model):
    base.check_decoder_layer(model, hparams.layer, "T-Patcher")

  def init(model, params=None):
    """The memory: `memory_size` MLP inputs of `layer` over WikiText-2,
    and those of `memory_task`'s training prompts."""
    check_model(model)
    params = model.params if params is None else params
    rows = corpus_memory(model, params, hparams.layer, hparams.memory_size)
    if hparams.memory_task and hparams.memory_task_records:
      rows = np.concatenate([rows, task_memory(
          model, params, hparams.layer, hparams.memory_task,
          hparams.memory_task_records)])
    return TPatcherState(memory=jnp.asarray(rows),
                         memory_count=jnp.int32(len(rows)),
                         num_edits=jnp.zeros((), jnp.int32),
                         layer=hparams.layer)

  def apply(model, params, requests, state: TPatcherState):
    """Adds and trains up to `max_neurons` patch neurons per request, in
    turn, each on the model the earlier requests left."""
    check_model(model)
    if not isinstance(state, TPatcherState):
      raise errors.InputError(
          f"T-Patcher needs the state its init returns, got "
          f"{type(state).__name__}.")
    if state.layer != hparams.layer:
      raise errors.ConfigError(
          f"the T-Patcher state's memory was read at layer {state.layer}, "
          f"not {hparams.layer}; call init again.")
    requests = base.make_requests(requests)
    encoded = [_encode(model, r) for r in requests]  # validate before work
    timer = base.Timer()
    layer, where = hparams.layer, site(hparams)
    width = model.config.hidden_size
    _, adapter = patch(params, hparams)
    if adapter is None:
      adapter = empty_patch(hparams.capacity, width, width, hparams.activation)
    elif dict(adapter.options).get("activation") != hparams.activation:
      raise errors.ConfigError(
          f"the patch at {where} uses activation="
          f"{dict(adapter.options).get('activation')!r}, not "
          f"{hparams.activation!r}.")
    train = functools.partial(
        _train, model.config, layer=layer, activation=hparams.activation,
        steps=hparams.steps, lr=hparams.lr, stop_nll=hparams.stop_nll,
        margin_pos=hparams.margin_pos, margin_neg=hparams.margin_neg,
        act_weight=hparams.act_weight, memory_weight=hparams.memory_weight)
    new_params = params
    records = []
    extras = {"steps": [], "nll": [], "neurons": [], "greedy": [],
              "act_min": [], "memory_max": []}
    count = int(state.num_edits)
    for request, (prompt, target) in zip(requests, encoded):
      with timer("inputs"):
        x = _edit_inputs(model, new_params, layer, prompt, target)
      with timer("train"):
        trainee, on, taken_all, aux = _fit(train, new_params, state, x,
                                           hparams, width)
      touched = []
      for slot in range(int(on.sum())):
        free = np.flatnonzero(np.asarray(adapter.params["active"]) == 0)
        entry = int(free[0]) if free.size else adapter.params["keys"].shape[0]
        adapter = adapters_lib.grow(adapter, entry + 1)
        adapter = adapters_lib.set_slot(adapter, entry, keys=trainee["keys"][slot],
                       bias=trainee["bias"][slot],
                       values=trainee["values"][slot], active=1)
        touched.append(base.AdapterEntry(where, KIND, entry, "add", None))
      if touched:
        new_params = adapters_lib.put(new_params, site(hparams), KIND, adapter)
      # Later neurons must stay silent on this edit's input too.
      state = _append_memory(state, x["h_in"], count + 1)
      count += 1
      records.append(base.EditRecord(
          id=uuid.uuid4().hex, method="tpatcher", request=request,
          touched=tuple(touched)))
      extras["steps"].append(taken_all)
      extras["neurons"].append(len(touched))
      if aux is None:
        extras["nll"].append(float(np.mean(x["nll"])))
        extras["greedy"].append(bool(np.all(x["greedy"])))
        extras["act_min"].append(None)
        extras["memory_max"].append(None)
      else:
        extras["nll"].append(float(aux["nll"]))
        extras["greedy"].append(bool(np.all(
            np.asarray(aux["greedy_T"])[:len(target)])))
        extras["act_min"].append(float(aux["act_min"]))
        extras["memory_max"].append(float(aux["memory_max"]))
    extras["patch_neurons"] = size(new_params, hparams)
    extras["memory_rows"] = int(state.memory_count)
    info = base.EditInfo(changed={}, seconds=timer.seconds, extras=extras,
                         records=records)
    return new_params, state, info

  return base.FunctionalEditor("tpatcher", hparams, init, apply)


def remove(params, hparams: TPatcherHParams, records):
  """`params` without the neurons of `records` (an `EditRecord` or a list).

  Each named neuron is zeroed (key, bias, value) and deactivated, so it
  adds exactly 0: the model's output is then bit-for-bit the one without
  those neurons (the other neurons unchanged). `params` is left untouched.

  Raises:
    InputError: no patch at the site, or a record naming a slot beyond it.
  """
  if isinstance(records, base.EditRecord):
    records = [records]
  _, adapter = patch(params, hparams)
  if adapter is None:
    raise errors.InputError(f"no T-Patcher patch at {site(hparams)}.")
  cap = adapter.params["keys"].shape[0]
  for record in records:
    for entry in record.touched:
      if not isinstance(entry, base.AdapterEntry) or entry.kind != KIND:
        continue
      if entry.index >= cap:
        raise errors.InputError(
            f"record {record.id} names neuron {entry.index}, beyond the "
            f"patch's {cap} slots.")
      adapter = adapters_lib.set_slot(adapter, entry.index, keys=0.0, bias=0.0, values=0.0,
                     active=0)
  return adapters_lib.put(params, site(hparams), KIND, adapter)


__all__ = ["TPatcherHParams", "TPatcherState", "corpus_memory", "empty_patch",
           "patch", "patch_neurons", "remove", "site", "size", "tpatcher"]
