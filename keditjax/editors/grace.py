"""GRACE: a discrete key-value codebook beside one layer (Hartvigsen et al.,
NeurIPS 2023, "Aging with GRACE: lifelong model editing with discrete
key-value adaptors").

The weights never change. A codebook sits at one MLP output projection
(`layer/{l}/mlp/value`) as an adapter in `params["adapters"]`:

  - keys: the projection's input (`layer/{l}/mlp/key`) at an edit prompt's
    last token; each key has a deferral radius ε;
  - values: activations that replace the projection's output.

At inference every position's query (its `mlp/key` activation) is compared
with the keys (Euclidean); if the nearest key is within its ε, its value
replaces the layer's output there, else the layer runs unchanged (§3.1).

An edit (§3.2): with no key within reach (nearest distance d > ε_j + ε₀) a new
entry is added with ε₀; within reach and the same label, the nearest entry's
radius grows to cover the new key ("coverage" expansion); within reach and a
different label, both radii become d/2 ("split"). The chosen entry's value is
then trained with Adam on the target's NLL, starting from the layer's current
output (or zeros, `value_init="cold"`), and stops as soon as every target token
is the greedy continuation.

ε₀ is relative: `eps_factor` × ‖key‖ of the edit, so one setting carries over
between models whose activations differ in scale.

Replacement modes (`replacement`):
  - "replace_last" (default): each position whose query hits is replaced.
    Position-wise, so KV-cached generation equals a full forward pass.
  - "replace_all": from the first hit on, every later position gets the value
    of the most recent hit (causal within one forward pass; under a KV cache
    a decoding step only sees its own query).
  - "replace_prompt": every position up to the last hit in the sequence gets
    its value (reads the whole sequence: not causal).

Removing an edit (`remove`) undoes what its record says exactly: an added
entry is deactivated (its slot zeroed), an expansion or a split gets its old
radius (and value) back.

Known bugs of the EasyEdit port that this file avoids (tests check both):
labels kept in a list that is *prepended* to while keys are *appended* (so a
key's label is another edit's), and edit ids kept as nested lists that break
deletion. Here an entry's key, value, radius and label live at the same index
of arrays, and each record names the entries it touched.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from keditjax import errors
from keditjax.editors import base
from keditjax.models import adapters as adapters_lib
from keditjax.models import lm
from keditjax.models import sites as sites_lib

REPLACEMENTS = ("replace_last", "replace_all", "replace_prompt")
VALUE_INITS = ("current", "cold")
KIND = "grace"


@dataclasses.dataclass(frozen=True)
class GraceHParams:
  """GRACE hyper-parameters (the reference's names in brackets).

  Attributes:
    layer: the block whose MLP output projection gets the codebook
      [inner_params]; the reference uses a late block (27 of 32 in
      Llama-2-7B); 24 of SmolLM2-135M's 30 is the same depth.
    eps_factor: ε₀ = eps_factor × ‖key‖ [eps, absolute there]. Chosen by
      `experiments.grace_sweep` on 100 CounterFact training records
      (docs/results/grace_sweep.json): at 0.05 no neighbourhood prompt and
      no other edit prompt falls within reach of a key at layers 12-27,
      at 0.1 1% of neighbourhood prompts do; paraphrases lie ~1.0 ‖k‖
      away, so GRACE does not generalise to them at any safe radius.
    replacement: see the module docstring [replacement].
    steps: most Adam steps per value [n_iter].
    lr: Adam's learning rate [edit_lr].
    stop_nll: training stops once every target token is the greedy one and
      the target's mean NLL is at most this (a greedy target alone can still
      be less likely, per token, than the old answer).
    value_init: "current" (the layer's output at the edit, the reference)
      or "cold" (zeros).
    expand: "coverage" (grow ε to the new key) [eps_expand].
    capacity: initial codebook slots; it doubles when full (each size is a
      new compiled shape, so doubling keeps recompiles logarithmic).
  """
  layer: int = 24
  eps_factor: float = 0.05
  replacement: str = "replace_last"
  steps: int = 100
  lr: float = 0.5
  stop_nll: float = 0.1
  value_init: str = "current"
  expand: str = "coverage"
  capacity: int = 16

  def __post_init__(self):
    if not self.eps_factor > 0:
      raise errors.ConfigError(
          f"GRACE eps_factor={self.eps_factor} must be > 0 (the deferral "
          "radius relative to the key norm).")
    if self.replacement not in REPLACEMENTS:
      raise errors.ConfigError(
          f"GRACE replacement={self.replacement!r}; use one of "
          f"{REPLACEMENTS}.")
    if self.value_init not in VALUE_INITS:
      raise errors.ConfigError(
          f"GRACE value_init={self.value_init!r}; use one of {VALUE_INITS}.")
    if self.expand != "coverage":
      raise errors.ConfigError(
          f"GRACE expand={self.expand!r}; only 'coverage' is implemented.")
    if self.steps < 1 or not self.lr > 0 or self.capacity < 1:
      raise errors.ConfigError(
          f"GRACE needs steps >= 1, lr > 0, capacity >= 1; got "
          f"{self.steps}, {self.lr}, {self.capacity}.")


# -- the adapter ------------------------------------------------------------

def codebook_lookup(params, x_BxLxD, inputs, *, replacement="replace_last"):
  """GRACE's forward rule: the nearest active key within its ε replaces the
  output with its value (module docstring for the modes).

  Args:
    params: {"keys": [C, F], "values": [C, D], "eps": [C], "labels": [C],
      "active": [C] (1 live, 0 free or removed)}.
    x_BxLxD: the layer's output.
    inputs: {"mlp/key": queries [B, L, F]}.
    replacement: "replace_last", "replace_all" or "replace_prompt".
  """
  q_BxLxF = inputs["mlp/key"].astype(jnp.float32)
  keys_CxF = params["keys"].astype(jnp.float32)
  d2_BxLxC = (jnp.sum(q_BxLxF ** 2, -1, keepdims=True)
              - 2.0 * jnp.einsum("blf,cf->blc", q_BxLxF, keys_CxF)
              + jnp.sum(keys_CxF ** 2, -1))
  live_C = params["active"] > 0
  d2_BxLxC = jnp.where(live_C, d2_BxLxC, jnp.inf)
  nearest_BxL = jnp.argmin(d2_BxLxC, axis=-1)
  dist_BxL = jnp.sqrt(jnp.maximum(jnp.min(d2_BxLxC, axis=-1), 0.0))
  hit_BxL = (dist_BxL <= params["eps"][nearest_BxL]) & live_C[nearest_BxL]
  length = x_BxLxD.shape[1]
  t_L = jnp.arange(length)
  if replacement == "replace_last":
    entry_BxL = nearest_BxL
  elif replacement == "replace_all":
    last_hit_BxL = jax.lax.cummax(jnp.where(hit_BxL, t_L, -1), axis=1)
    entry_BxL = jnp.take_along_axis(
        nearest_BxL, jnp.maximum(last_hit_BxL, 0), axis=1)
    hit_BxL = last_hit_BxL >= 0
  else:  # replace_prompt
    last_B = jnp.max(jnp.where(hit_BxL, t_L, -1), axis=1)
    entry_BxL = jnp.broadcast_to(
        jnp.take_along_axis(nearest_BxL, jnp.maximum(last_B, 0)[:, None], 1),
        nearest_BxL.shape)
    hit_BxL = t_L[None] <= last_B[:, None]
  values_BxLxD = params["values"][entry_BxL].astype(x_BxLxD.dtype)
  return jnp.where(hit_BxL[..., None], values_BxLxD, x_BxLxD)


def site(hparams: GraceHParams) -> str:
  return f"layer/{hparams.layer}/mlp/value"


def codebook(params, hparams):
  """(index in the site's adapter stack, the GRACE adapter) or (None, None)."""
  return adapters_lib.find(params, site(hparams), KIND)


def empty_codebook(capacity: int, key_dim: int, value_dim: int,
                   replacement: str) -> adapters_lib.Adapter:
  """A GRACE adapter with `capacity` free slots."""
  return adapters_lib.Adapter(
      params={"keys": jnp.zeros((capacity, key_dim), jnp.float32),
              "values": jnp.zeros((capacity, value_dim), jnp.float32),
              "eps": jnp.zeros((capacity,), jnp.float32),
              "labels": jnp.zeros((capacity,), jnp.int32),
              "active": jnp.zeros((capacity,), jnp.int32)},
      fn=codebook_lookup, inputs=("mlp/key",),
      options=(("replacement", replacement),), kind=KIND)




def label_of(target: str) -> int:
  """A stable int32 label for a target string (crc32)."""
  return zlib.crc32(target.strip().encode()) & 0x7FFFFFFF


def size(params, hparams: GraceHParams) -> int:
  """Live codebook entries."""
  _, a = codebook(params, hparams)
  return 0 if a is None else int(np.sum(np.asarray(a.params["active"])))


# -- the value optimisation --------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "layer", "steps", "lr",
                                             "stop_nll"))
def _train_value(config, params, hidden_1xLxD, mask_1xL, replace_1xL,
                 where_1xT, targets_1xT, tmask_1xT, v0_D, *, layer: int,
                 steps: int, lr: float, stop_nll: float):
  """Adam on the value replacing `layer/{layer}/mlp/value` where
  `replace_1xL` is 1 (the positions the codebook will replace at inference,
  for the replacement mode), for the target's mean NLL; stops once every
  target token is the argmax and the NLL is at most `stop_nll`.

  Returns:
    (value, steps taken, final NLL, whether the target is greedy).
  """
  name = f"layer/{layer}/mlp/value"
  tx = optax.adam(lr)

  def loss_fn(v_D):
    # The value enters as one more adapter after the codebook, so training
    # sees the model exactly as inference will.
    trainee = adapters_lib.Adapter({"value": v_D, "where": replace_1xL},
                                   _replace_where, kind="grace-training")
    edited = adapters_lib.with_adapters(
        params, name, adapters_lib.at(params, name) + (trainee,))
    logits, _, _ = lm.run(config, edited, hidden=hidden_1xLxD,
                          start_layer=layer, attention_mask=mask_1xL,
                          logit_positions=where_1xT)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp_1xT = jnp.take_along_axis(logp, targets_1xT[..., None], -1)[..., 0]
    nll = -jnp.sum(lp_1xT * tmask_1xT) / jnp.sum(tmask_1xT)
    greedy = jnp.all((jnp.argmax(logits, -1) == targets_1xT) | (tmask_1xT == 0))
    return nll, greedy & (nll <= stop_nll)

  def cond(carry):
    _, _, i, greedy, _ = carry
    return (i < steps) & ~greedy

  def body(carry):
    v_D, opt, i, _, _ = carry
    (nll, greedy), g = jax.value_and_grad(loss_fn, has_aux=True)(v_D)
    updates, new_opt = tx.update(g, opt, v_D)
    new_v = optax.apply_updates(v_D, updates)
    # Already done: keep this value (the early stop) rather than step on.
    v_D = jnp.where(greedy, v_D, new_v)
    opt = jax.tree.map(lambda a, b: jnp.where(greedy, a, b), opt, new_opt)
    return v_D, opt, i + jnp.where(greedy, 0, 1), greedy, nll

  v0_D = v0_D.astype(jnp.float32)
  init = (v0_D, tx.init(v0_D), jnp.int32(0), jnp.bool_(False),
          jnp.float32(jnp.inf))
  v_D, _, taken, greedy, nll = jax.lax.while_loop(cond, body, init)
  final_nll, final_greedy = loss_fn(v_D)
  return v_D, taken, final_nll, final_greedy


def _replace_where(params, x_BxLxD, inputs):
  """The value being trained, written where `params["where"]` is 1."""
  del inputs
  where_BxLx1 = params["where"][..., None] > 0
  return jnp.where(where_BxLx1, params["value"].astype(x_BxLxD.dtype), x_BxLxD)


def _replace_mask(replacement: str, last: int, length: int) -> np.ndarray:
  """[1, L]: where a hit at `last` replaces the output in this mode."""
  t = np.arange(length)
  rule = {"replace_last": t == last, "replace_all": t >= last,
          "replace_prompt": t <= last}[replacement]
  return rule.astype(np.float32)[None]


def _encode(model, request):
  return base.encode_request(model, request, "GRACE")


def _edit_inputs(model, params, layer, prompt, target):
  """Key, current value, the residual entering `layer`, and the target
  layout for one request (right-padded to a length bucket)."""
  layout = base.edit_layout(model, prompt, target)
  tokens, mask, where, targets, tmask = (
      layout[k] for k in ("tokens", "mask", "where", "targets", "tmask"))
  last = np.array([len(prompt) - 1], np.int32)
  names = (f"layer/{layer}/mlp/key", f"layer/{layer}/mlp/value")
  hidden, out = _prefix(model.config, params, jnp.asarray(tokens),
                           jnp.asarray(mask), jnp.asarray(last), layer=layer,
                           names=names)
  return dict(key=np.asarray(out[names[0]][0, 0], np.float32),
              value=np.asarray(out[names[1]][0, 0], np.float32),
              hidden=hidden, mask=jnp.asarray(mask), last=jnp.asarray(last),
              where=jnp.asarray(where), targets=jnp.asarray(targets),
              tmask=jnp.asarray(tmask))


@functools.partial(jax.jit, static_argnames=("config", "layer", "names"))
def _prefix(config, params, tokens, mask, last, *, layer, names):
  """The residual entering `layer`, and `names` captured at `last`."""
  hidden, _, _ = lm.run(config, params, tokens, attention_mask=mask,
                        stop_layer=layer)
  _, out, _ = lm.run(config, params, hidden=hidden, start_layer=layer,
                     stop_layer=layer + 1, attention_mask=mask,
                     sites=sites_lib.capture(*names, positions=last))
  return hidden, out


def _placed(model, adapter):
  """The codebook replicated over a sharded model's mesh (`model.mesh`): it
  is small next to the weights, and the sharded forward pass takes adapters
  replicated. Unchanged for an unsharded model."""
  mesh = getattr(model, "mesh", None)
  if mesh is None:
    return adapter
  return dataclasses.replace(adapter, params=jax.device_put(
      adapter.params, NamedSharding(mesh, PartitionSpec())))


# -- the editor --------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GraceState:
  """GRACE keeps its codebook in params; the state only counts edits."""
  num_edits: jax.Array






def grace(hparams: GraceHParams = GraceHParams()):
  """The GRACE editor (module docstring)."""

  def check_model(model):
    base.check_decoder_layer(model, hparams.layer, "GRACE")

  def init(model, params=None):
    """Checks the layer; GRACE needs no statistics."""
    del params
    check_model(model)
    return GraceState(num_edits=jnp.zeros((), jnp.int32))

  def apply(model, params, requests, state: GraceState):
    """Adds (or expands, or splits) one codebook entry per request, in turn."""
    check_model(model)
    requests = base.make_requests(requests)
    encoded = [_encode(model, r) for r in requests]  # validate before work
    timer = base.Timer()
    layer, where = hparams.layer, site(hparams)
    index, adapter = codebook(params, hparams)
    if adapter is None:
      adapter = empty_codebook(hparams.capacity, model.config.intermediate_size,
                               model.config.hidden_size, hparams.replacement)
    elif dict(adapter.options).get("replacement") != hparams.replacement:
      raise errors.ConfigError(
          f"the codebook at {where} uses replacement="
          f"{dict(adapter.options).get('replacement')!r}, not "
          f"{hparams.replacement!r}.")
    new_params = params
    records, extras = [], {"steps": [], "nll": [], "greedy": [], "action": []}
    count = int(state.num_edits)
    for request, (prompt, target) in zip(requests, encoded):
      with timer("key"):
        x = _edit_inputs(model, new_params, layer, prompt, target)
      key_F = x["key"]
      eps0 = hparams.eps_factor * float(np.linalg.norm(key_F))
      label = label_of(request.target_new)
      p = jax.tree.map(np.asarray, adapter.params)
      live = np.flatnonzero(p["active"] > 0)
      touched = []
      if live.size:
        dists = np.linalg.norm(p["keys"][live] - key_F, axis=1)
        j = int(live[np.argmin(dists)])
        d = float(np.min(dists))
      if not live.size or d > p["eps"][j] + eps0:
        action = "add"
      elif p["labels"][j] == label:
        action = "expand"
      else:
        action = "split"
      if action == "expand":
        entry = j
        touched.append(base.AdapterEntry(
            where, KIND, entry, "expand",
            {"eps": float(p["eps"][j]), "value": p["values"][j].copy()}))
        adapter = adapters_lib.set_slot(adapter, j, eps=max(float(p["eps"][j]), d))
        v0 = p["values"][j]
      else:
        radius = eps0
        if action == "split":
          radius = d / 2.0
          touched.append(base.AdapterEntry(
              where, KIND, j, "shrink", {"eps": float(p["eps"][j])}))
          adapter = adapters_lib.set_slot(adapter, j, eps=min(float(p["eps"][j]), radius))
        free = np.flatnonzero(p["active"] == 0)
        entry = int(free[0]) if free.size else p["keys"].shape[0]
        adapter = adapters_lib.grow(adapter, entry + 1)
        adapter = adapters_lib.set_slot(adapter, entry, keys=key_F, eps=radius, labels=label,
                       active=1, values=jnp.zeros(model.config.hidden_size))
        touched.append(base.AdapterEntry(where, KIND, entry, "add", None))
        v0 = (x["value"] if hparams.value_init == "current" else
              np.zeros_like(x["value"]))
      # The value is trained on the model as it was before this request (its
      # codebook included), written where the new key will act at inference
      # (the edit's last prompt token, and for replace_all/replace_prompt
      # the positions after/before it).
      with timer("value"):
        value, taken, nll, greedy = _train_value(
            model.config, new_params, x["hidden"], x["mask"],
            jnp.asarray(_replace_mask(hparams.replacement,
                                      int(x["last"][0]),
                                      x["mask"].shape[1])), x["where"], x["targets"], x["tmask"],
            jnp.asarray(v0), layer=layer, steps=hparams.steps, lr=hparams.lr,
            stop_nll=hparams.stop_nll)
      adapter = _placed(model, adapters_lib.set_slot(adapter, entry,
                                                     values=value))
      new_params = adapters_lib.put(new_params, site(hparams), KIND, adapter)
      count += 1
      records.append(base.EditRecord(
          id=uuid.uuid4().hex, method="grace", request=request,
          touched=tuple(touched)))
      extras["steps"].append(int(taken))
      extras["nll"].append(float(nll))
      extras["greedy"].append(bool(greedy))
      extras["action"].append(action)
    extras["codebook_size"] = size(new_params, hparams)
    info = base.EditInfo(changed={}, seconds=timer.seconds, extras=extras,
                         records=records)
    return new_params, GraceState(num_edits=jnp.int32(count)), info

  return base.FunctionalEditor("grace", hparams, init, apply)


def remove(params, hparams: GraceHParams, records):
  """`params` without the edits of `records` (an `EditRecord` or a list).

  Each record's entries are undone in reverse order: an added entry is
  deactivated and its slot zeroed (so the codebook no longer holds its key),
  a shrunk or expanded entry gets its old radius (and value) back. `params`
  is left untouched.
  """
  if isinstance(records, base.EditRecord):
    records = [records]
  _, adapter = codebook(params, hparams)
  if adapter is None:
    raise errors.InputError(f"no GRACE codebook at {site(hparams)}.")
  for record in reversed(list(records)):
    for entry in reversed(record.touched):
      if not isinstance(entry, base.AdapterEntry) or entry.kind != KIND:
        continue
      if entry.index >= adapter.params["keys"].shape[0]:
        raise errors.InputError(
            f"record {record.id} names entry {entry.index}, beyond the "
            "codebook.")
      if entry.action == "add":
        adapter = adapters_lib.set_slot(adapter, entry.index, keys=0.0, values=0.0, eps=0.0,
                       labels=0, active=0)
      elif entry.action == "shrink":
        adapter = adapters_lib.set_slot(adapter, entry.index, eps=entry.previous["eps"])
      elif entry.action == "expand":
        adapter = adapters_lib.set_slot(adapter, entry.index, eps=entry.previous["eps"],
                       values=entry.previous["value"])
  return adapters_lib.put(params, site(hparams), KIND, adapter)


__all__ = ["GraceHParams", "GraceState", "codebook", "codebook_lookup",
           "grace", "label_of", "remove", "size"]
