"""WISE: a routed side memory beside one FFN (Wang et al., NeurIPS 2024,
"WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models").

The weights never change. One MLP output projection (`layer/{l}/mlp/value`,
W_main: [F, D]) gets a *side memory*: copies W_side = W_main + Δ that are
edited while W_main stays frozen. They live as one adapter of kind "wise" in
`params["adapters"]`, holding S shards' Δ_s stacked as [S, F, D] (§3.1):

  side output_s = key @ W_side_s = x + key @ Δ_s,   x = key @ W_main.

Routing (§3.1, Eq. 3): per position, the activation distance of each shard
from the main memory,

  d_s = ‖act(x + key @ Δ_s) − act(x)‖,

with `act` the model's MLP non-linearity, as the reference's `euc` applies it
to the projection's outputs. A shard fires when d_s > its threshold
(`act_ratio` × the smallest in-scope distance seen while it was edited); the
firing shard with the largest d_s gives the output, else the main memory does
(WISE-Retrieve's rule; with one shard it is WISE's rule).

The reference averages d over *all* tokens of the input, which is not causal.
Two causal routers (`router`):
  - "token" (default): d at position t alone. The key at t has attended to
    every position ≤ t, so it summarises the prompt at the position that
    predicts the target. The output at t depends only on position t's
    activations: KV-cached generation equals a full forward pass exactly.
  - "running_mean": the mean of d over positions ≤ t (the last prompt
    position sees the whole prompt, as the reference's mean does). Causal
    within one forward pass, but NOT KV-cache-safe: an adapter is stateless
    (`keditjax.models.adapters`: it sees the current chunk's activations
    only), so under a KV cache a decoding step averages over its own new
    positions, and a left-padded prompt's padding counts in the mean. Making
    it cache-safe needs adapter state in the KV cache, which adapters lack.
    Use it for teacher-forced scoring only.

An edit (§3.2, Eq. 4-5): Adam on the current shard's Δ for

  NLL(target | prompt, bare and behind short generated prefixes)
  + margin_weight × [mean⁺ relu(d_out − d_in + γ) + mean⁺ relu(d_out − α)
                     + mean⁺ relu(β − d_in)]
  + replay × mean_m ‖key_m @ Δ − u_m‖² / scale²

where mean⁺ averages the positive terms only (the reference's rule), and the
distances are in units of `scale` (below). d_in are the distances at the
edit's in-scope positions: with `scope="last"` (default) the last prompt
token of every row, the position whose output predicts the target; with
"subject", every prompt position from the subject's last token on. d_out are
those of fixed out-of-scope tokens captured in `init` and kept in the state:
WikiText-2 paragraphs and CounterFact training-split locality prompts
(another subject, the same relation: the reference's per-edit `loc_prompt`),
plus, per edit, `hard_negatives` prompts of the edit's own template around
other training-split subjects, at their last token. These are the prompts a
router on the last token confuses with the edit: at a late layer the last
token's key mostly encodes the relation and the answer it predicts, which a
CounterFact neighbourhood prompt shares with the edit prompt (on
SmolLM2-135M, without them 40-65% of the neighbourhood prompts fired).
Training writes the side memory exactly where the router should send the
edit at inference, the in-scope positions (target positions are left out:
their keys are the target's own tokens, which a neighbourhood prompt scored
with the same target shares, so routing them leaks the edit). Gradients pass
a random mask (`mask_ratio` of Δ's entries, a new mask per shard: knowledge
sharding, §3.2), and after each step Δ is clipped element-wise to
|Δ| ≤ `norm_constraint` × |W_main|.

The replay term is an addition (in the spirit of the reference's optional
replay, its Appendix B.3, which re-runs earlier edits' inputs for their
margins): each edit's bare-prompt in-scope keys key_m and the side output
change u_m = key_m @ Δ right after it are kept in the state for the current
shard, and later edits pay for moving them. Without it, sequential edits into
one shard overwrite each other's masked entries (on SmolLM2-135M, 20
CounterFact edits: efficacy 60% at the end, 100% at edit time; with it 85%).

Units: the reference's α=5, β=20, γ=10 are absolute distances for
Llama-2-7B's layer-27 down_proj. Here distances are divided by `scale`, the
median ‖act(mlp/value)‖ of the layer on the WikiText-2 tokens, measured in
`init` (SmolLM2-135M layer 24: 88), so α, β, γ are fractions of a typical
activation. Dividing also balances the loss: a raw distance's gradient per
unit is ~‖key‖² (~600 here) against the NLL's ~‖key‖² × 0.01-0.1, so raw
margins swamp the NLL at any step size that lets the NLL move; the
`margin_weight` then sets their balance (chosen by sweep).

Shards and merging (§3.3): every `save_freq` edits the current shard is
closed and a new one (Δ = 0, a fresh mask) starts; every `merge_freq` edits
the closed shards are merged by TIES (`ties_merge`: trim to `density` by
magnitude, elect the sign by the weighted sum, average the agreeing entries).
`retrieve=True` (WISE-Retrieve, the reference default) merges the shards
closed since the last merge into one more retrievable shard; `retrieve=False`
(WISE-Merge) merges every shard, earlier merges included, into one.

The default is one shard per edit (`save_freq=1`, `merge_freq=1000`: no
merge within the first 1000 edits), each with its own threshold. Measured
on 20 CounterFact training-split edits (experiments.wise_sweep,
docs/results/wise_sweep.json), one shard shared by all the edits routes badly:
its threshold is act_ratio × the smallest in-scope distance of any of its
edits (those vary 42-77 here, so one weakly separated edit lowers it for
all), and later edits raise the distances of earlier edits' neighbours.
65% of the neighbourhood prompts and 11% of held-out WikiText-2 fired, and
the neighbourhood score fell 10 points below the unedited model's (on the
first 20 training records, the edits also interfered: 15% failed even with
the shard forced on). A shard per edit is trained alone against its own
hard negatives and keeps its own threshold: edit prompts fire 100%,
neighbourhood prompts 5%, WikiText-2 0%. The cost is
inference: S shards' side outputs per position (S × F × D work), which
merging (`merge_freq`) bounds on long sequences.

Removal (`remove`) is exact for the most recent edits, undone newest first:
each record keeps the entries its edit changed (the shard's masked entries,
threshold and flags; for a merge, the merged shards whole) and a digest of
the shard right after the edit. An older edit whose shard a later edit (or
a merge) has changed since cannot be removed exactly: the later edits trained
the same masked entries starting from its values, and a TIES merge trims,
drops disagreeing signs and averages, which no subtraction undoes. `remove`
refuses those (InputError) instead of returning a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors
from keditjax.editors import base
from keditjax.models import adapters as adapters_lib
from keditjax.models import layers as layers_lib
from keditjax.models import lm
from keditjax.models import sites as sites_lib

KIND = "wise"
ROUTERS = ("token", "running_mean")
OPTIMIZERS = ("sgd", "adam")
SCOPES = ("last", "subject")
# The reference's context prefixes: greedy continuations of these starts,
# 5 and 10 tokens long (EasyEdit `get_context_templates`, [[5, 5], [10, 5]]).
CONTEXT_STARTS = ("I", "You", "Because", "Yes", "Q: ")
# Subjects (of the first CounterFact training-split records) that hard
# negatives put into an edit's own prompt template.
SUBJECT_POOL = 1024


@dataclasses.dataclass(frozen=True)
class WiseHParams:
  """WISE hyper-parameters (the reference's names in brackets).

  Defaults were chosen with `experiments.wise_sweep` on CounterFact
  training-split records (docs/results/wise_sweep.json), never on the edit
  split the acceptance run scores.

  Attributes:
    layer: the block whose MLP output projection gets the side memory
      [inner_params]; the reference uses 27 of Llama-2-7B's 32 blocks; 24 of
      SmolLM2's 30 is the depth GRACE uses here.
    router: "token" or "running_mean" (module docstring).
    retrieve: WISE-Retrieve (True) or WISE-Merge (False) [retrieve].
    mask_ratio: share of Δ's entries one shard trains [mask_ratio].
    steps: most optimiser steps per edit [n_iter].
    optimizer: "adam" or "sgd" (the reference: SGD, lr 1.0, on a 7B model).
      Adam's steps are in weight units, so one lr carries across models; SGD
      at 1.0 overshoots here and at 0.1 leaves the NLL at ~5 after 40 steps.
    lr: the optimiser's learning rate [edit_lr].
    norm_constraint: |Δ| ≤ norm_constraint × |W_main| element-wise (the
      reference clamps to W_main ± norm_constraint, absolute, which for a
      7B model's ~0.02 weights does not bind).
    act_ratio: threshold = act_ratio × the smallest in-scope distance
      [act_ratio].
    alpha: out-of-scope distances should stay below alpha × scale [α].
    beta: in-scope distances should exceed beta × scale [β].
    gamma: in-scope should exceed out-of-scope by gamma × scale [γ]. The
      reference's 5:20:10 ratios kept roughly (here 1:5:3); in units of the
      scale because the absolute values are Llama-2-7B's (module docstring).
    margin_weight: weight of the margin terms against the NLL.
    save_freq: edits per shard [save_freq]; 1: a shard (and threshold) per
      edit (module docstring; the reference's 500 is for 1000 edits into a
      7B model's layer).
    merge_freq: edits between merges; a multiple of save_freq [merge_freq].
    density: TIES keeps this share of each shard's entries [densities].
    num_contexts: generated prefixes per edit (0-10) in front of the prompt
      besides the bare prompt; the reference uses all 10, 4 halves the cost
      on a CPU.
    num_negatives: WikiText-2 rows whose tokens give out-of-scope distances
      (each `negative_length` tokens, the first one dropped) and the scale.
    negative_length: tokens per WikiText-2 row.
    locality_prompts: CounterFact training-split locality prompts (another
      subject, the same relation, with its answer) whose tokens join the
      out-of-scope set, as the reference's per-edit `loc_prompt` does.
    hard_negatives: per edit, prompts of the edit's template around other
      subjects (from the first SUBJECT_POOL training-split records) whose
      last token joins the out-of-scope set (module docstring).
    scope: the in-scope positions, "last" (the last prompt token) or
      "subject" (from the subject's last token on); module docstring.
    stop_nll: an edit stops early once every target token is greedy, the
      mean target NLL is at most this and the margin terms are 0.
    replay: weight of the replay term (module docstring; 0: off, the
      reference's default).
    replay_capacity: initial rows of the replay memory (doubles when full).
    seed: the shards' gradient masks come from this seed.
    capacity: initial shard slots; doubles when full (each size is a new
      compiled shape, so doubling keeps recompiles logarithmic).
  """
  layer: int = 24
  router: str = "token"
  retrieve: bool = True
  mask_ratio: float = 0.2
  steps: int = 70
  optimizer: str = "adam"
  lr: float = 1e-2
  norm_constraint: float = 1.0
  act_ratio: float = 0.88
  alpha: float = 0.05
  beta: float = 0.25
  gamma: float = 0.15
  save_freq: int = 1
  merge_freq: int = 1000
  density: float = 0.53
  num_contexts: int = 4
  num_negatives: int = 16
  negative_length: int = 33
  locality_prompts: int = 512
  hard_negatives: int = 8
  scope: str = "last"
  margin_weight: float = 10.0
  stop_nll: float = 0.1
  replay: float = 100.0
  replay_capacity: int = 64
  seed: int = 0
  capacity: int = 2

  def __post_init__(self):
    if self.router not in ROUTERS:
      raise errors.ConfigError(
          f"WISE router={self.router!r}; use one of {ROUTERS}.")
    if self.optimizer not in OPTIMIZERS:
      raise errors.ConfigError(
          f"WISE optimizer={self.optimizer!r}; use one of {OPTIMIZERS}.")
    if not 0 < self.mask_ratio <= 1:
      raise errors.ConfigError(
          f"WISE mask_ratio={self.mask_ratio} must lie in (0, 1].")
    if not 0 < self.density <= 1:
      raise errors.ConfigError(
          f"WISE density={self.density} must lie in (0, 1].")
    if not 0 < self.act_ratio:
      raise errors.ConfigError(
          f"WISE act_ratio={self.act_ratio} must be > 0.")
    for name in ("alpha", "beta", "gamma"):
      if not getattr(self, name) >= 0:
        raise errors.ConfigError(f"WISE {name}={getattr(self, name)} must "
                                 "be >= 0 (a multiple of the activation "
                                 "scale).")
    if self.steps < 1 or not self.lr > 0 or self.capacity < 1:
      raise errors.ConfigError(
          f"WISE needs steps >= 1, lr > 0, capacity >= 1; got {self.steps}, "
          f"{self.lr}, {self.capacity}.")
    if not self.norm_constraint > 0:
      raise errors.ConfigError(
          f"WISE norm_constraint={self.norm_constraint} must be > 0.")
    if self.save_freq < 1 or self.merge_freq < 1 or (
        self.merge_freq % self.save_freq):
      raise errors.ConfigError(
          f"WISE needs save_freq >= 1 and merge_freq a multiple of it; got "
          f"save_freq={self.save_freq}, merge_freq={self.merge_freq}.")
    if not 0 <= self.num_contexts <= 2 * len(CONTEXT_STARTS):
      raise errors.ConfigError(
          f"WISE num_contexts={self.num_contexts} must lie in "
          f"[0, {2 * len(CONTEXT_STARTS)}].")
    if self.scope not in SCOPES:
      raise errors.ConfigError(
          f"WISE scope={self.scope!r}; use one of {SCOPES}.")
    if not 0 <= self.hard_negatives <= SUBJECT_POOL // 2:
      raise errors.ConfigError(
          f"WISE hard_negatives={self.hard_negatives} must lie in "
          f"[0, {SUBJECT_POOL // 2}].")
    if self.locality_prompts < 0:
      raise errors.ConfigError(
          f"WISE locality_prompts={self.locality_prompts} must be >= 0.")
    if self.num_negatives < 1 or self.negative_length < 2:
      raise errors.ConfigError(
          f"WISE needs num_negatives >= 1 and negative_length >= 2; got "
          f"{self.num_negatives}, {self.negative_length}.")
    if not self.replay >= 0 or self.replay_capacity < 1:
      raise errors.ConfigError(
          f"WISE needs replay >= 0 and replay_capacity >= 1; got "
          f"{self.replay}, {self.replay_capacity}.")
    if not self.stop_nll >= 0:
      raise errors.ConfigError(f"WISE stop_nll={self.stop_nll} must be >= 0.")


# -- the adapter ------------------------------------------------------------

def shard_distances(deltas_SxFxD, x_BxLxD, key_BxLxF, act: str):
  """d_s = ‖act(x + key @ Δ_s) − act(x)‖ per shard and position (Eq. 3).

  Returns:
    (side outputs [S, B, L, D] float32, distances [S, B, L]).
  """
  x = x_BxLxD.astype(jnp.float32)
  side_SxBxLxD = x[None] + jnp.einsum("blf,sfd->sbld",
                                      key_BxLxF.astype(jnp.float32),
                                      deltas_SxFxD.astype(jnp.float32))
  fn = layers_lib.activation(act)
  d_SxBxL = jnp.linalg.norm(fn(side_SxBxLxD) - fn(x)[None], axis=-1)
  return side_SxBxLxD, d_SxBxL


def running_mean(d_SxBxL):
  """The mean of d over positions ≤ t, per t."""
  count_L = jnp.arange(1, d_SxBxL.shape[-1] + 1, dtype=jnp.float32)
  return jnp.cumsum(d_SxBxL, axis=-1) / count_L


def route(params, x_BxLxD, inputs, *, act="silu", router="token"):
  """WISE's forward rule: the firing shard with the largest distance gives
  the output, else the main memory's `x` stays (module docstring).

  Args:
    params: {"deltas": [S, F, D] (W_side_s − W_main), "threshold": [S],
      "active": [S] int32 (1 live), "merged": [S] int32 (1: a TIES merge)}.
    x_BxLxD: the main memory's output (`key @ W_main`).
    inputs: {"mlp/key": [B, L, F]}, the projection's input.
    act: the model's MLP non-linearity (the distance is taken after it).
    router: "token" or "running_mean".
  """
  side_SxBxLxD, d_SxBxL = shard_distances(params["deltas"], x_BxLxD,
                                          inputs["mlp/key"], act)
  if router == "running_mean":
    d_SxBxL = running_mean(d_SxBxL)
  live_S = params["active"] > 0
  fires_SxBxL = (d_SxBxL > params["threshold"][:, None, None]) & live_S[
      :, None, None]
  score_SxBxL = jnp.where(fires_SxBxL, d_SxBxL, -jnp.inf)
  best_BxL = jnp.argmax(score_SxBxL, axis=0)
  side_BxLxD = jnp.take_along_axis(side_SxBxLxD, best_BxL[None, ..., None],
                                   axis=0)[0]
  hit_BxL = jnp.any(fires_SxBxL, axis=0)
  return jnp.where(hit_BxL[..., None], side_BxLxD.astype(x_BxLxD.dtype),
                   x_BxLxD)


def wise_adapter(deltas_SxFxD, threshold_S, active_S=None, merged_S=None, *,
                 act: str = "silu",
                 router: str = "token") -> adapters_lib.Adapter:
  """A WISE adapter holding the given shards (public: a latency benchmark can
  build one with S random shards).

  Args:
    deltas_SxFxD: W_side_s − W_main per shard.
    threshold_S: each shard's routing threshold (inf: never fires).
    active_S: 1 for a live shard (default: all live).
    merged_S: 1 for a shard that is a TIES merge (default: none).
    act: the model's MLP non-linearity name (`ModelConfig.activation`).
    router: "token" or "running_mean".
  """
  if router not in ROUTERS:
    raise errors.ConfigError(f"WISE router={router!r}; use one of {ROUTERS}.")
  deltas = jnp.asarray(deltas_SxFxD, jnp.float32)
  count = deltas.shape[0]
  ones = jnp.ones((count,), jnp.int32)
  return adapters_lib.Adapter(
      params={"deltas": deltas,
              "threshold": jnp.asarray(threshold_S, jnp.float32),
              "active": ones if active_S is None else jnp.asarray(active_S,
                                                                  jnp.int32),
              "merged": (0 * ones if merged_S is None else
                         jnp.asarray(merged_S, jnp.int32))},
      fn=route, inputs=("mlp/key",),
      options=(("act", act), ("router", router)), kind=KIND)


def empty_adapter(capacity: int, key_dim: int, value_dim: int, *,
                  act: str = "silu", router: str = "token"):
  """A WISE adapter with `capacity` free shard slots."""
  return wise_adapter(np.zeros((capacity, key_dim, value_dim), np.float32),
                      np.full((capacity,), np.inf, np.float32),
                      np.zeros((capacity,), np.int32), act=act, router=router)


def site(hparams: WiseHParams) -> str:
  """The side memory's site, `layer/{layer}/mlp/value`."""
  return f"layer/{hparams.layer}/mlp/value"


def side_memory(params, hparams: WiseHParams):
  """(index in the site's adapter stack, the WISE adapter) or (None, None)."""
  for i, a in enumerate(adapters_lib.at(params, site(hparams))):
    if a.kind == KIND:
      return i, a
  return None, None


def _put(params, hparams, adapter):
  """params with the WISE adapter at its site replaced by `adapter` (None:
  dropped)."""
  index, _ = side_memory(params, hparams)
  stack = list(adapters_lib.at(params, site(hparams)))
  if index is None:
    stack.append(adapter)
  elif adapter is None:
    del stack[index]
  else:
    stack[index] = adapter
  return adapters_lib.with_adapters(params, site(hparams),
                                    [a for a in stack if a is not None])


def size(params, hparams: WiseHParams) -> int:
  """Live shards."""
  _, a = side_memory(params, hparams)
  return 0 if a is None else int(np.sum(np.asarray(a.params["active"])))


# -- TIES merging -------------------------------------------------------------

def ties_merge(deltas_SxN, weights_S, density: float):
  """TIES-merging of task vectors (Yadav et al., NeurIPS 2023), as WISE's
  reference runs it (`GTA('magnitude', 'sum', normalize=True)`).

  1. Trim: each δ_s keeps its k = int(density × N) largest-magnitude entries
     (ties: the lower index first), the rest become 0.
  2. Elect: the sign of Σ_s w_s δ_s per entry (0 counts as +).
  3. Disjoint mean: Σ_s w_s δ_s [sign agrees] / Σ_s w_s [sign agrees]
     (entries no shard agrees on stay 0).

  Args:
    deltas_SxN: S task vectors (flattened, or any trailing shape).
    weights_S: each vector's weight.
    density: share of entries each vector keeps, in (0, 1].

  Returns:
    The merged task vector, shaped like one of `deltas_SxN`.
  """
  deltas = jnp.asarray(deltas_SxN, jnp.float32)
  shape = deltas.shape[1:]
  flat_SxN = deltas.reshape(deltas.shape[0], -1)
  n = flat_SxN.shape[1]
  k = int(density * n)
  if density < 1:
    if k < 1:
      raise errors.ConfigError(
          f"TIES density={density} keeps no entry of {n}.")
    _, keep_SxK = jax.lax.top_k(jnp.abs(flat_SxN), k)
    rows_Sx1 = jnp.arange(flat_SxN.shape[0])[:, None]
    kept = jnp.zeros_like(flat_SxN).at[rows_Sx1, keep_SxK].set(1.0)
    flat_SxN = flat_SxN * kept
  w_Sx1 = jnp.asarray(weights_S, jnp.float32)[:, None]
  weighted_SxN = flat_SxN * w_Sx1
  elected_N = jnp.where(jnp.sum(weighted_SxN, axis=0) >= 0, 1.0, -1.0)
  agree_SxN = (jnp.sign(weighted_SxN) == elected_N).astype(jnp.float32)
  total_N = jnp.sum(weighted_SxN * agree_SxN, axis=0)
  divisor_N = jnp.sum(w_Sx1 * agree_SxN, axis=0)
  divisor_N = jnp.where(divisor_N == 0, 1.0, divisor_N)
  return (total_N / divisor_N).reshape(shape)


# -- the edit optimisation ----------------------------------------------------

def _write_in_scope(params, x_BxLxD, inputs):
  """Training's side memory: x + key @ Δ where `params["scope"]` is 1."""
  write_BxLx1 = params["scope"][..., None] > 0
  delta_BxLxD = jnp.einsum("blf,fd->bld",
                           inputs["mlp/key"].astype(jnp.float32),
                           params["delta"])
  return jnp.where(write_BxLx1, x_BxLxD + delta_BxLxD.astype(x_BxLxD.dtype),
                   x_BxLxD)


def _mean_positive(z, where=None):
  """Mean of the positive entries of z (0 when none), the reference's rule."""
  pos = z > 0
  if where is not None:
    pos = pos & where
  return jnp.sum(jnp.where(pos, z, 0.0)) / jnp.maximum(jnp.sum(pos), 1)


def _distances(delta_FxD, key_NxF, x_NxD, act):
  side = x_NxD + key_NxF @ delta_FxD
  fn = layers_lib.activation(act)
  return jnp.linalg.norm(fn(side) - fn(x_NxD), axis=-1)


def _in_scope_statistic(d_RxL, scope_RxL, valid_RxL, router):
  """The edit's in-scope distance as the router sees it: the mean over
  in-scope positions of d (or of its running mean over real positions), the
  smallest over the context rows. The reference's `save_editing_activation`
  averages over rows; with a few rows the bare prompt can then fall below
  act_ratio × the mean and not route to its own edit, which the minimum
  rules out."""
  if router == "running_mean":
    cum = jnp.cumsum(d_RxL * valid_RxL, axis=1)
    d_RxL = cum / jnp.maximum(jnp.cumsum(valid_RxL, axis=1), 1.0)
  per_row = jnp.sum(d_RxL * scope_RxL, 1) / jnp.maximum(jnp.sum(scope_RxL, 1),
                                                        1.0)
  return jnp.min(per_row)


@functools.partial(jax.jit, static_argnames=("config", "layer", "steps",
                                             "act", "router", "optimizer"))
def _train_shard(config, params, hidden_RxLxD, mask_RxL, scope_RxL, key_RxLxF,
                 x_RxLxD, where_RxT, targets_RxT, tmask_RxT, neg_key_NxF,
                 neg_x_NxD, memory_key_MxF, memory_out_MxD, memory_valid_M,
                 delta0_FxD, grad_mask_FxD, bound_FxD, margins_3, scale,
                 margin_weight, replay, lr, stop_nll, *, layer: int,
                 steps: int, act: str, router: str, optimizer: str):
  """Adam on one shard's Δ for Eq. 4-5 (module docstring); stops early once
  every target token is greedy, the NLL is at most `stop_nll` and the margin
  terms are 0.

  Returns:
    (Δ, steps taken, final NLL, final margin loss, in-scope statistic).
  """
  name = f"layer/{layer}/mlp/value"
  alpha, beta, gamma = margins_3[0], margins_3[1], margins_3[2]
  tx = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
  scope = scope_RxL > 0
  neg_key = neg_key_NxF.astype(jnp.float32)
  neg_x = neg_x_NxD.astype(jnp.float32)
  key = key_RxLxF.astype(jnp.float32)
  x = x_RxLxD.astype(jnp.float32)

  def losses(delta_FxD):
    trainee = adapters_lib.Adapter({"delta": delta_FxD, "scope": scope_RxL},
                                   _write_in_scope, inputs=("mlp/key",),
                                   kind="wise-training")
    edited = adapters_lib.with_adapters(
        params, name, adapters_lib.at(params, name) + (trainee,))
    logits, _, _ = lm.run(config, edited, hidden=hidden_RxLxD,
                          start_layer=layer, attention_mask=mask_RxL,
                          logit_positions=where_RxT)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp_RxT = jnp.take_along_axis(logp, targets_RxT[..., None], -1)[..., 0]
    nll_R = -jnp.sum(lp_RxT * tmask_RxT, 1) / jnp.sum(tmask_RxT, 1)
    nll = jnp.mean(nll_R)
    greedy = jnp.all((jnp.argmax(logits, -1) == targets_RxT) |
                     (tmask_RxT == 0))
    d_in_RxL = jnp.linalg.norm(
        layers_lib.activation(act)(x + jnp.einsum("rlf,fd->rld", key,
                                                  delta_FxD))
        - layers_lib.activation(act)(x), axis=-1)
    d_out_N = _distances(delta_FxD, neg_key, neg_x, act)
    # The margins in units of the activation scale: a raw distance's
    # gradient is ~‖key‖² per unit, tens of times the NLL's, so raw margins
    # would swamp the NLL at any step size that lets the NLL move.
    d_in = d_in_RxL / scale
    d_out = d_out_N / scale
    pair = d_out[None, None, :] - d_in[..., None] + gamma
    margin = (_mean_positive(pair, scope[..., None])
              + _mean_positive(d_out - alpha)
              + _mean_positive(beta - d_in, scope))
    # Replay: the shard's earlier edits keep their side outputs at their
    # in-scope keys (squared drift in units of the scale).
    drift_M = jnp.sum((memory_key_MxF @ delta_FxD - memory_out_MxD) ** 2, -1)
    anchor = replay * jnp.sum(drift_M * memory_valid_M) / (
        jnp.maximum(jnp.sum(memory_valid_M), 1.0) * scale ** 2)
    return nll + margin_weight * margin + anchor, (nll, margin, greedy,
                                                    d_in_RxL)

  def done(nll, margin, greedy):
    return greedy & (nll <= stop_nll) & (margin <= 0)

  def cond(carry):
    _, _, i, stop = carry
    return (i < steps) & ~stop

  def body(carry):
    delta, opt, i, _ = carry
    (_, (nll, margin, greedy, _)), g = jax.value_and_grad(
        losses, has_aux=True)(delta)
    stop = done(nll, margin, greedy)
    # Knowledge sharding: only this shard's entries learn.
    updates, new_opt = tx.update(g * grad_mask_FxD, opt, delta)
    new_delta = jnp.clip(optax.apply_updates(delta, updates), -bound_FxD,
                         bound_FxD)
    delta = jnp.where(stop, delta, new_delta)
    opt = jax.tree.map(lambda a, b: jnp.where(stop, a, b), opt, new_opt)
    return delta, opt, i + jnp.where(stop, 0, 1), stop

  delta0 = delta0_FxD.astype(jnp.float32)
  delta, _, taken, _ = jax.lax.while_loop(
      cond, body, (delta0, tx.init(delta0), jnp.int32(0), jnp.bool_(False)))
  _, (nll, margin, _, d_in_RxL) = losses(delta)
  valid = mask_RxL.astype(jnp.float32)
  stat = _in_scope_statistic(d_in_RxL, scope_RxL.astype(jnp.float32), valid,
                             router)
  return delta, taken, nll, margin, stat


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _layer_inputs(config, params, tokens, mask, *, layer):
  """The residual entering `layer`, and its `mlp/key` and `mlp/value`."""
  hidden, _, _ = lm.run(config, params, tokens, attention_mask=mask,
                        stop_layer=layer)
  names = (f"layer/{layer}/mlp/key", f"layer/{layer}/mlp/value")
  _, out, _ = lm.run(config, params, hidden=hidden, start_layer=layer,
                     stop_layer=layer + 1, attention_mask=mask,
                     sites=sites_lib.capture(*names))
  return hidden, out[names[0]], out[names[1]]


def grad_mask(key_data, shard: int, shape, ratio: float) -> np.ndarray:
  """Shard `shard`'s gradient mask: each entry trains with probability
  `ratio` (seeded by the state's key and the shard number)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(
      jnp.asarray(key_data, jnp.uint32)), shard)
  return np.asarray(jax.random.bernoulli(key, ratio, shape))


# -- the editor --------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WiseState:
  """Counters, the mask key and the fixed data an edit uses.

  Attributes:
    num_edits: edits so far (drives the save/merge schedule).
    shards: shards started so far (the next shard's mask number).
    slot: the adapter slot of the shard being written.
    key: the gradient masks' PRNG key data (uint32).
    contexts: generated prefixes' token ids [C, Lc] (0-padded).
    context_lengths: their lengths [C].
    neg_key: out-of-scope `mlp/key` activations [N, F] (WikiText-2).
    neg_value: their `mlp/value` activations [N, D].
    memory_key: the current shard's edits' in-scope keys [M, F] (the bare
      prompt's, for `replay`; capacity doubles).
    memory_out: the side memory's change key @ Δ there, right after each
      edit [M, D].
    memory_count: rows of `memory_key` in use.
    subjects: the hard negatives' subject pool, token ids [P, Ls] (0-padded).
    subject_lengths: their lengths [P].
    scale: median ‖act(mlp/value)‖ over those tokens (the margins' unit).
  """
  num_edits: jax.Array
  shards: jax.Array
  slot: jax.Array
  key: jax.Array
  contexts: jax.Array
  context_lengths: jax.Array
  neg_key: jax.Array
  neg_value: jax.Array
  memory_key: jax.Array
  memory_out: jax.Array
  memory_count: jax.Array
  scale: jax.Array
  subjects: jax.Array
  subject_lengths: jax.Array


def _negative_tokens(model, hparams):
  """`num_negatives` WikiText-2 paragraphs of `negative_length` tokens."""
  from keditjax import stats  # the one corpus reader
  rows = []
  for text in stats.resolve_corpus(stats.DEFAULT_CORPUS).texts():
    ids = model.encode(text)
    if len(ids) >= hparams.negative_length:
      rows.append(ids[:hparams.negative_length])
    if len(rows) == hparams.num_negatives:
      break
  if len(rows) < hparams.num_negatives:
    raise errors.InputError(
        f"WikiText-2 has only {len(rows)} paragraphs of "
        f"{hparams.negative_length} tokens; lower num_negatives.")
  return rows


def _locality_rows(model, count):
  """The first `count` CounterFact training-split locality prompts with their
  answers (another subject, the same relation: the near misses an edit must
  not route)."""
  from keditjax import data  # the one data resolver
  rows = []
  for record in data.read_records("counterfact-train")[:count]:
    text = record["locality_prompt"] + " " + record["locality_ground_truth"]
    rows.append(model.encode(text))
  return rows


def _subject_pool(model, count):
  """Token ids of the first `count` CounterFact training-split subjects
  (0-padded) and their lengths."""
  from keditjax import data  # the one data resolver
  rows = [model.encode(r["subject"])
          for r in data.read_records("counterfact-train")[:count]]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, np.asarray([len(r) for r in rows], np.int32)


def _hard_rows(model, request, state, hparams, count):
  """`hard_negatives` prompts: the request's own template around other
  subjects (the neighbourhood prompts a router on the last token confuses
  with the edit: same relation, same last tokens)."""
  ids = np.asarray(state.subjects)
  lengths = np.asarray(state.subject_lengths)
  rng = np.random.default_rng((hparams.seed, count))
  rows = []
  for i in rng.permutation(len(ids)):
    subject = model.tokenizer.decode([int(t) for t in ids[i, :lengths[i]]])
    if subject.strip() and subject.strip() != request.subject.strip():
      rows.append(model.encode(request.prompt.format(subject.strip())))
    if len(rows) == hparams.hard_negatives:
      break
  return rows


def _padded_layer_inputs(model, params, layer, rows):
  """`rows` right-padded to a bucket (cut at the context): the mask and the
  layer's `mlp/key` and `mlp/value` at every position."""
  length = min(lm.bucket(max(map(len, rows))),
               model.config.max_position_embeddings)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, ids in enumerate(rows):
    ids = ids[:length]
    tokens[r, :len(ids)] = ids
    mask[r, :len(ids)] = 1
  _, key, value = _layer_inputs(model.config, params, jnp.asarray(tokens),
                                jnp.asarray(mask), layer=layer)
  return mask, key, value


def _capture_last(model, params, layer, rows):
  """`mlp/key` and `mlp/value` at the last position of each of `rows`."""
  mask, key, value = _padded_layer_inputs(model, params, layer, rows)
  last = mask.sum(1) - 1
  pick = np.arange(len(rows))
  return (np.asarray(key, np.float32)[pick, last],
          np.asarray(value, np.float32)[pick, last])


def _capture_rows(model, params, layer, rows):
  """`mlp/key` and `mlp/value` at every position but the first of `rows`
  (position 0 carries the attention sink's outsized activations), flat."""
  mask, key, value = _padded_layer_inputs(model, params, layer, rows)
  keep = mask.astype(bool)
  keep[:, 0] = False
  return (np.asarray(key, np.float32)[keep],
          np.asarray(value, np.float32)[keep])


def _contexts(model, params, count):
  """The reference's prefixes: greedy continuations (5 and 10 new tokens)
  of `CONTEXT_STARTS`, as token ids, the first `count` of them."""
  out = []
  for length in (5, 10):
    starts = [model.encode(s) for s in CONTEXT_STARTS]
    new = model.generate(params, starts, max_new_tokens=length,
                         return_ids=True, stop_at_eos=True)
    out += [s + n for s, n in zip(starts, new)]
  out = out[:count]
  width = max([len(c) for c in out] + [1])
  ids = np.zeros((max(count, 1), width), np.int32)
  lengths = np.zeros((max(count, 1),), np.int32)
  for i, c in enumerate(out):
    ids[i, :len(c)] = c
    lengths[i] = len(c)
  return ids, lengths


def _encode_rows(model, request, contexts, lengths, num_contexts):
  """Per context row: (prompt ids, index of the subject's last token)."""
  tok = model.tokenizer
  text = request.text
  head = request.prompt[:request.prompt.index("{}")] + request.subject
  rows = [(tok.encode(text), len(tok.encode(head.rstrip())) - 1)]
  for i in range(num_contexts):
    ctx = [int(t) for t in contexts[i, :lengths[i]]]
    rows.append((ctx + tok.encode(" " + text),
                 len(ctx) + len(tok.encode(" " + head.rstrip())) - 1))
  return rows


def _encode(model, request, hparams, state):
  """Validated token rows for one request (before any work)."""
  if model.tokenizer is None:
    raise errors.TokenizerError(f"WISE needs a tokenizer; {model!r} has none.")
  target = model.tokenizer.encode(request.target_new)
  rows = _encode_rows(model, request, np.asarray(state.contexts),
                      np.asarray(state.context_lengths), hparams.num_contexts)
  if not target or not rows[0][0]:
    raise errors.InputError(
        f"request {request.case_id!r}: empty prompt or target after "
        "tokenization.")
  limit = model.config.max_position_embeddings
  longest = max(len(p) for p, _ in rows) + len(target)
  if longest > limit:
    raise errors.InputError(
        f"request {request.case_id!r}: prompt (with its longest context) + "
        f"target is {longest} tokens; the model takes {limit}.")
  return rows, target


def _edit_batch(rows, target, limit, scope_from="subject"):
  """Right-padded rows of prompt + target, the in-scope mask (from the
  subject's last token to the last position predicting a target token) and
  the target layout."""
  count = len(rows)
  length = min(lm.bucket(max(len(p) for p, _ in rows) + len(target)), limit)
  width = lm.bucket(len(target), 4)
  tokens = np.zeros((count, length), np.int32)
  mask = np.zeros((count, length), np.int32)
  scope = np.zeros((count, length), np.float32)
  where = np.zeros((count, width), np.int32)
  targets = np.zeros((count, width), np.int32)
  tmask = np.zeros((count, width), np.float32)
  for r, (prompt, subject_last) in enumerate(rows):
    ids = prompt + target
    tokens[r, :len(ids)] = ids
    mask[r, :len(ids)] = 1
    first = len(prompt) - 1
    subject_last = min(max(subject_last, 0), first)
    if scope_from == "subject":
      first = subject_last
    scope[r, first:len(prompt)] = 1
    where[r, :len(target)] = np.arange(len(prompt) - 1, len(ids) - 1)
    targets[r, :len(target)] = target
    tmask[r, :len(target)] = 1
  return tokens, mask, scope, where, targets, tmask


def _grow(adapter, needed: int):
  """The adapter with at least `needed` slots (doubling)."""
  cap = adapter.params["deltas"].shape[0]
  if needed <= cap:
    return adapter
  new_cap = cap
  while new_cap < needed:
    new_cap *= 2
  fill = {"deltas": 0.0, "threshold": np.inf, "active": 0, "merged": 0}
  p = {k: jnp.concatenate([v, jnp.full((new_cap - cap,) + v.shape[1:],
                                       fill[k], v.dtype)])
       for k, v in adapter.params.items()}
  return dataclasses.replace(adapter, params=p)


def _append(keys_MxF, outs_MxD, count, new_keys, new_outs):
  """The replay memory with rows appended at `count` (doubling when full)."""
  needed = count + len(new_keys)
  cap = keys_MxF.shape[0]
  if needed > cap:
    new_cap = max(cap, 1)
    while new_cap < needed:
      new_cap *= 2
    grow = lambda a: np.concatenate(
        [a, np.zeros((new_cap - cap,) + a.shape[1:], a.dtype)])
    keys_MxF, outs_MxD = grow(keys_MxF), grow(outs_MxD)
  keys_MxF, outs_MxD = keys_MxF.copy(), outs_MxD.copy()
  keys_MxF[count:needed] = new_keys
  outs_MxD[count:needed] = new_outs
  return keys_MxF, outs_MxD


def _set(adapter, index, **fields):
  p = dict(adapter.params)
  for name, value in fields.items():
    p[name] = p[name].at[index].set(value)
  return dataclasses.replace(adapter, params=p)


def _digest(array) -> str:
  return hashlib.sha256(
      np.ascontiguousarray(np.asarray(array, np.float32)).tobytes()).hexdigest()


def _slot_fields(adapter, slot):
  p = adapter.params
  return {"threshold": float(p["threshold"][slot]),
          "active": int(p["active"][slot]), "merged": int(p["merged"][slot])}


def shards_after(n: int, hparams: WiseHParams) -> int:
  """Live shards after n edits from an empty side memory, by the schedule:
  a shard per `save_freq` edits, those since the last merge folded into one
  every `merge_freq` edits (WISE-Retrieve keeps each merge; WISE-Merge folds
  everything into one)."""
  merges = n // hparams.merge_freq
  if not hparams.retrieve:
    merges = min(merges, 1)
  return max(1, merges + -(-(n % hparams.merge_freq) // hparams.save_freq))


def _merge(adapter, hparams, where):
  """Merges shards by TIES (module docstring): retrieve merges the unmerged
  shards into one more shard, merge mode folds every shard into one.

  Returns:
    (adapter, its AdapterEntry, or (adapter, None) when nothing merges).
  """
  p = jax.tree.map(np.asarray, adapter.params)
  live = p["active"] > 0
  fresh = np.flatnonzero(live & (p["merged"] == 0))
  old = np.flatnonzero(live & (p["merged"] > 0))
  if hparams.retrieve:
    slots, weights = fresh, np.full(len(fresh), 1.0 / max(len(fresh), 1))
  elif old.size:
    # The reference: earlier merges weigh 0.6, the new shards 0.4 together.
    slots = np.concatenate([fresh, old])
    weights = np.concatenate([np.full(len(fresh), 0.4 / max(len(fresh), 1)),
                              np.full(len(old), 0.6 / len(old))])
  else:
    slots, weights = fresh, np.full(len(fresh), 1.0 / max(len(fresh), 1))
  if not slots.size:
    return adapter, None
  slots = np.sort(slots)
  previous = {"slots": [int(s) for s in slots],
              "deltas": p["deltas"][slots].copy(),
              "threshold": p["threshold"][slots].copy(),
              "active": p["active"][slots].copy(),
              "merged": p["merged"][slots].copy()}
  merged = ties_merge(p["deltas"][slots], weights, hparams.density)
  target = int(slots[0])
  for s in slots[1:]:
    adapter = _set(adapter, int(s), deltas=0.0, threshold=np.inf, active=0,
                   merged=0)
  adapter = _set(adapter, target, deltas=merged,
                 threshold=float(np.min(p["threshold"][slots])), active=1,
                 merged=1)
  previous["after"] = _digest(adapter.params["deltas"][target])
  return adapter, base.AdapterEntry(where, KIND, target, "update", previous)


def wise(hparams: WiseHParams = WiseHParams()):
  """The WISE editor (module docstring)."""

  def check_model(model):
    base.check_decoder_layer(model, hparams.layer, "WISE")

  def init(model, params=None):
    """Generates the context prefixes and captures the out-of-scope tokens'
    activations at the layer (and their scale), with `params` (default the
    model's)."""
    check_model(model)
    if model.tokenizer is None:
      raise errors.TokenizerError(
          f"WISE needs a tokenizer; {model!r} has none.")
    params = model.params if params is None else params
    contexts, lengths = _contexts(model, params, hparams.num_contexts)
    # The main memory's activations (a side memory already there is not the
    # main memory).
    main_params = _put(params, hparams, None)
    key, value = _capture_rows(model, main_params, hparams.layer,
                               _negative_tokens(model, hparams))
    act = layers_lib.activation(model.config.activation)
    scale = float(np.median(np.linalg.norm(np.asarray(act(value)), axis=-1)))
    if hparams.locality_prompts:
      more_key, more_value = _capture_rows(
          model, main_params, hparams.layer,
          _locality_rows(model, hparams.locality_prompts))
      key = np.concatenate([key, more_key])
      value = np.concatenate([value, more_value])
    subjects, subject_lengths = _subject_pool(
        model, SUBJECT_POOL if hparams.hard_negatives else 1)
    return WiseState(
        num_edits=jnp.zeros((), jnp.int32), shards=jnp.zeros((), jnp.int32),
        slot=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(jax.random.key(hparams.seed)),
        contexts=jnp.asarray(contexts), context_lengths=jnp.asarray(lengths),
        neg_key=jnp.asarray(key), neg_value=jnp.asarray(value),
        memory_key=jnp.zeros((hparams.replay_capacity, key.shape[-1]),
                             jnp.float32),
        memory_out=jnp.zeros((hparams.replay_capacity, value.shape[-1]),
                             jnp.float32),
        memory_count=jnp.zeros((), jnp.int32),
        scale=jnp.float32(scale), subjects=jnp.asarray(subjects),
        subject_lengths=jnp.asarray(subject_lengths))

  def apply(model, params, requests, state: WiseState):
    """Writes each request into the current shard, in turn; starts, closes
    and merges shards on the `save_freq` / `merge_freq` schedule."""
    check_model(model)
    if not isinstance(state, WiseState):
      raise errors.InputError(
          f"WISE apply needs the WiseState from init, got "
          f"{type(state).__name__}.")
    requests = base.make_requests(requests)
    encoded = [_encode(model, r, hparams, state) for r in requests]
    timer = base.Timer()
    config, layer, where = model.config, hparams.layer, site(hparams)
    index, adapter = side_memory(params, hparams)
    options = (("act", config.activation), ("router", hparams.router))
    if adapter is None:
      adapter = empty_adapter(hparams.capacity, config.intermediate_size,
                              config.hidden_size, act=config.activation,
                              router=hparams.router)
    elif tuple(adapter.options) != options:
      raise errors.ConfigError(
          f"the WISE side memory at {where} has options "
          f"{dict(adapter.options)}, not {dict(options)}.")
    # Training sees the main memory (and any other adapter at the site), not
    # the other shards: the reference trains W_side alone.
    main_params = _put(params, hparams, None)
    w_main = np.asarray(base.get_leaf(params, model.site_param(where)),
                        np.float32)
    bound = jnp.asarray(hparams.norm_constraint * np.abs(w_main))
    scale = float(state.scale)
    margins = jnp.asarray([hparams.alpha, hparams.beta, hparams.gamma],
                          jnp.float32)
    count, shards, slot = (int(state.num_edits), int(state.shards),
                           int(state.slot))
    key_data = np.asarray(state.key)
    memory_key = np.asarray(state.memory_key)
    memory_out = np.asarray(state.memory_out)
    memory_count = int(state.memory_count)
    shape = (config.intermediate_size, config.hidden_size)
    mask = None
    if count % hparams.save_freq and shards > 0:
      mask = grad_mask(key_data, shards - 1, shape, hparams.mask_ratio)
    records, extras = [], {"steps": [], "nll": [], "margin": [],
                           "in_scope": [], "threshold": [], "merged": []}
    for request, (rows, target) in zip(requests, encoded):
      touched = []
      cap = adapter.params["deltas"].shape[0]
      if count % hparams.save_freq == 0 or mask is None or slot >= cap:
        # A new shard: a free slot, a fresh mask (the previous shard, if
        # any, stays as it is: closed).
        free = np.flatnonzero(np.asarray(adapter.params["active"]) == 0)
        slot = int(free[0]) if free.size else cap
        adapter = _grow(adapter, slot + 1)
        adapter = _set(adapter, slot, deltas=0.0, threshold=np.inf, active=0,
                       merged=0)
        mask = grad_mask(key_data, shards, shape, hparams.mask_ratio)
        shards += 1
        memory_count = 0
      with timer("inputs"):
        tokens, attn, scope, positions, targets, tmask = _edit_batch(
            rows, target, config.max_position_embeddings, hparams.scope)
        hidden, key, value = jax.block_until_ready(_layer_inputs(
            config, main_params, jnp.asarray(tokens), jnp.asarray(attn),
            layer=layer))
        neg_key, neg_value = state.neg_key, state.neg_value
        if hparams.hard_negatives:
          hard_key, hard_value = _capture_last(
              model, main_params, layer,
              _hard_rows(model, request, state, hparams, count))
          neg_key = jnp.concatenate([neg_key, jnp.asarray(hard_key)])
          neg_value = jnp.concatenate([neg_value, jnp.asarray(hard_value)])
      old = adapter.params["deltas"][slot]
      previous = dict(_slot_fields(adapter, slot),
                      mask_bits=np.packbits(mask),
                      values=np.asarray(old)[mask].copy())
      with timer("train"):
        delta, taken, nll, margin, stat = _train_shard(
            config, main_params, hidden, jnp.asarray(attn),
            jnp.asarray(scope), key, value, jnp.asarray(positions),
            jnp.asarray(targets), jnp.asarray(tmask), neg_key,
            neg_value, jnp.asarray(memory_key), jnp.asarray(memory_out),
            jnp.asarray(np.arange(len(memory_key)) < memory_count,
                        jnp.float32),
            old, jnp.asarray(mask, jnp.float32), bound, margins,
            jnp.float32(scale), jnp.float32(hparams.margin_weight),
            jnp.float32(hparams.replay), jnp.float32(hparams.lr),
            jnp.float32(hparams.stop_nll),
            layer=layer, steps=hparams.steps, act=config.activation,
            router=hparams.router, optimizer=hparams.optimizer)
        delta = jax.block_until_ready(delta)
      threshold = min(previous["threshold"], hparams.act_ratio * float(stat))
      adapter = _set(adapter, slot, deltas=delta, threshold=threshold,
                     active=1)
      previous["after"] = _digest(adapter.params["deltas"][slot])
      # The bare prompt's in-scope keys join the shard's replay memory.
      in_scope = np.flatnonzero(scope[0] > 0)
      keys_new = np.asarray(key[0], np.float32)[in_scope]
      memory_key, memory_out = _append(
          memory_key, memory_out, memory_count, keys_new,
          keys_new @ np.asarray(delta, np.float32))
      memory_count += len(in_scope)
      touched.append(base.AdapterEntry(where, KIND, slot, "update", previous))
      count += 1
      merged = False
      if count % hparams.merge_freq == 0:
        with timer("merge"):
          adapter, entry = _merge(adapter, hparams, where)
        if entry is not None:
          touched.append(entry)
          merged = True
      records.append(base.EditRecord(
          id=uuid.uuid4().hex, method="wise", request=request,
          touched=tuple(touched)))
      extras["steps"].append(int(taken))
      extras["nll"].append(float(nll))
      extras["margin"].append(float(margin))
      extras["in_scope"].append(float(stat))
      extras["threshold"].append(float(threshold))
      extras["merged"].append(merged)
    new_params = _put(params, hparams, adapter)
    extras["shards"] = size(new_params, hparams)
    extras["scale"] = scale
    info = base.EditInfo(changed={}, seconds=timer.seconds, extras=extras,
                         records=records)
    new_state = dataclasses.replace(
        state, num_edits=jnp.int32(count), shards=jnp.int32(shards),
        slot=jnp.int32(slot), memory_key=jnp.asarray(memory_key),
        memory_out=jnp.asarray(memory_out),
        memory_count=jnp.int32(memory_count))
    return new_params, new_state, info

  return base.FunctionalEditor("wise", hparams, init, apply)


def remove(params, hparams: WiseHParams, records):
  """`params` without the edits of `records` (an `EditRecord` or a list),
  undone newest first.

  Exact where it can be: an edit's shard entries (its masked values,
  threshold and flags) and a merge's shards are restored bit for bit,
  provided the shard is still as that edit left it (its digest matches).
  When a later edit or a merge has changed the shard since, the edit cannot
  be taken out exactly (module docstring) and `InputError` says so: remove
  the later edits first. The editor state's counters are not rewound (keep
  the old state, as with params, to continue from before the edit).
  `params` is left untouched.
  """
  if isinstance(records, base.EditRecord):
    records = [records]
  _, adapter = side_memory(params, hparams)
  if adapter is None:
    raise errors.InputError(f"no WISE side memory at {site(hparams)}.")
  cap = adapter.params["deltas"].shape[0]
  for record in reversed(list(records)):
    for entry in reversed(record.touched):
      if not isinstance(entry, base.AdapterEntry) or entry.kind != KIND:
        continue
      prev = entry.previous or {}
      if entry.index >= cap or "after" not in prev:
        raise errors.InputError(
            f"record {record.id} names shard {entry.index}, which this side "
            "memory does not hold.")
      if _digest(adapter.params["deltas"][entry.index]) != prev["after"]:
        raise errors.InputError(
            f"record {record.id}: shard {entry.index} has changed since this "
            "edit (a later edit trained it, or a TIES merge folded it in); "
            "only the most recent edits can be removed exactly. Remove the "
            "later records first.")
      if "slots" in prev:  # a merge: the merged shards come back whole
        for j, s in enumerate(prev["slots"]):
          adapter = _set(adapter, s, deltas=prev["deltas"][j],
                         threshold=prev["threshold"][j],
                         active=prev["active"][j], merged=prev["merged"][j])
        continue
      shape = adapter.params["deltas"].shape[1:]
      mask = np.unpackbits(prev["mask_bits"],
                           count=int(np.prod(shape))).reshape(shape) > 0
      delta = np.array(adapter.params["deltas"][entry.index])
      delta[mask] = prev["values"]
      adapter = _set(adapter, entry.index, deltas=delta,
                     threshold=prev["threshold"], active=prev["active"],
                     merged=prev["merged"])
  if not np.any(np.asarray(adapter.params["active"])):
    return _put(params, hparams, None)
  return _put(params, hparams, adapter)


__all__ = ["WiseHParams", "WiseState", "empty_adapter", "grad_mask", "remove",
           "route", "shard_distances", "side_memory", "size", "ties_merge",
           "wise", "wise_adapter"]
