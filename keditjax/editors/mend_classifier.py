"""MEND for the fact checker (MiniLM encoder + linear head, FEVER verdicts).

The same editor network as `editors/mend.py` (Mitchell et al. 2022), on two
linear layers of a classifier:

  - the last encoder block's FFN output projection
    (`encoder/layer_{L-1}/output/kernel`): `x_t` is the `layer/ℓ/mlp/key`
    capture, `δ_t` the gradient of a zero patch at `layer/ℓ/mlp/value`;
  - the head (`head/kernel`): `x` is the pooled feature, `δ = ∂CE/∂logits`.

Each has its own network (their shapes differ). Training uses the
KnowledgeEditor's batches (the same edits, rewrites and other claims) and
MEND's loss: `c_edit · CE(new verdict | claim and rewrites) + c_loc ·
KL(p_θ(o) ‖ p_θ'(o))`, each edit applied alone (vmapped), as evaluated.
The data recipe is `evaluation.fever_training.build_mend_classifier`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keditjax import errors
from keditjax.editors import base, mend, tasks
from keditjax.editors import knowledge_editor as ke
from keditjax.models import bert
from keditjax.models import fact_checker as fc
from keditjax.models import sites as sites_lib


def edited_block(config) -> int:
  """The encoder block whose FFN output projection is edited (the last)."""
  return config.encoder.num_layers - 1


def targets(config) -> tuple:
  return (("encoder", f"layer_{edited_block(config)}", "output", "kernel"),
          ("head", "kernel"))


def _factors(config, params, hidden, mask, labels):
  """`[(x, δ, mask)]` for the FFN output and the head, CE summed over rows."""
  enc, block = config.encoder, edited_block(config)
  b, length, _ = hidden.shape
  value, key = f"layer/{block}/mlp/value", f"layer/{block}/mlp/key"
  attn = fc._attention(mask)  # pylint: disable=protected-access

  def loss(patch_value, logits_delta):
    out = {}
    sites = sites_lib.Sites(patches={value: sites_lib.Patch(patch_value)},
                            capture=(key,))
    x = bert.Layer(enc, block).apply(
        {"params": params["encoder"][f"layer_{block}"]}, hidden, attn, sites,
        out)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    logits = pooled @ params["head"]["kernel"] + params["head"][
        "bias"] + logits_delta
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return ce, (out[key], pooled)

  zeros = (jnp.zeros((b, length, enc.hidden_size)),
           jnp.zeros((b, params["head"]["kernel"].shape[1])))
  (d_value, d_logits), (keys, pooled) = jax.grad(
      loss, argnums=(0, 1), has_aux=True)(*zeros)
  sg = jax.lax.stop_gradient
  ones = jnp.ones((b, 1))
  return [(sg(keys), sg(d_value), mask.astype(jnp.float32)),
          (sg(pooled)[:, None], sg(d_logits)[:, None], ones)]


def _deltas(nets, norms, factors):
  return [mend.deltas(net, norm, [f])[0]
          for net, norm, f in zip(nets, norms, factors)]


def _edited(config, params, ds):
  return base.replace_leaves(params, {
      p: base.get_leaf(params, p) + d for p, d in zip(targets(config), ds)})


def make_loss(config, start: int, edit_weight: float, loc_weight: float):
  """`(nets, frozen, batch, rng) -> (loss, metrics)` on KnowledgeEditor batches."""
  key = fc.hidden_key(start)
  if start != edited_block(config):
    raise errors.ConfigError("mend_classifier batches must start at the "
                             f"last block ({edited_block(config)}); got {start}.")

  def per_edit(nets, frozen, x, x_mask, new, eq, eq_mask, eq_weight, o_batch,
               logp0):
    params, norms = frozen["params"], frozen["norm"]
    fs = _factors(config, params, x[None], x_mask[None], new[None])
    edited = _edited(config, params, _deltas(nets, norms, fs))
    return ke.edit_outcome(config, edited, key, x, x_mask, new, eq, eq_mask,
                           eq_weight, o_batch, logp0)

  def loss(nets, frozen, batch, rng):
    del rng
    o_batch = {key: batch["o"], "mask": batch["o_mask"]}
    logp0 = jax.lax.stop_gradient(jax.nn.log_softmax(
        fc.logits(config, frozen["params"], o_batch)))
    r = jax.vmap(per_edit, in_axes=(None, None, 0, 0, 0, 0, 0, 0, None, None))(
        nets, frozen, batch["x"], batch["x_mask"], batch["new"], batch["eq"],
        batch["eq_mask"], batch["eq_weight"], o_batch, logp0)
    edit, kl, metrics = ke.summarize(r)
    return edit_weight * edit + loc_weight * kl, metrics

  return loss


def init_nets(config, rank, init_lr, rng):
  """The two editor networks (FFN output projection, head), untrained."""
  enc = config.encoder
  shapes = ((enc.intermediate_size, enc.hidden_size),
            (enc.hidden_size, 2))
  keys = jax.random.split(rng, len(shapes))
  return [mend.init_net(k, num_layers=1, in_dim=i, out_dim=o, rank=rank,
                        init_lr=init_lr) for k, (i, o) in zip(keys, shapes)]


def norm_stats(config, params, pool, count):
  """Per-network mean/std of `[x; δ]` over the first `count` edits of
  `pool` (an `edit_pool` dict), which the networks' inputs are scaled by."""
  fs = jax.jit(functools.partial(_factors, config))(
      params, pool["x"][:count], pool["x_mask"][:count], pool["new"][:count])
  out = []
  for x, d, m in fs:
    z = np.concatenate([np.asarray(x), np.asarray(d)], -1)
    z = z.reshape(-1, z.shape[-1])[np.asarray(m).reshape(-1) > 0]
    std = z.std(0)
    out.append({"mean": z.mean(0)[None].astype(np.float32),
                "std": np.maximum(std, 1e-3 * std.mean() + 1e-12)[None].astype(
                    np.float32)})
  return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MendClassifierState:
  """The trained per-target networks and their input statistics.

  Attributes:
    nets, norms: one per edited target (`targets(config)`), as tuples.
    edits: `apply` calls so far through this state (an int32 array).
  """
  nets: tuple
  norms: tuple
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))


@dataclasses.dataclass(frozen=True)
class MendClassifierHParams:
  """No tunables at edit time: the trained networks carry everything."""
  scale: float = 1.0

  def __post_init__(self):
    if not self.scale > 0:
      raise errors.ConfigError(f"mend_classifier scale={self.scale} must be > 0.")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _edit(config, scale, nets, norms, params, tokens, mask, labels, weights):
  start = edited_block(config)
  hidden = fc.lower_hidden(config.encoder, params["encoder"], tokens, mask,
                           start)
  fs = _factors(config, params, hidden, mask, labels)
  fs = [(x * weights[:, None, None], d, m) for x, d, m in fs]
  return [scale * d for d in _deltas(nets, norms, fs)]


def mend_classifier(hparams: MendClassifierHParams = MendClassifierHParams()
                    ) -> base.FunctionalEditor:
  """The editor: `init(model, params=None, trained=(nets, norms))`."""
  hp = hparams

  def init(model, params=None, *, trained=None):
    """The trained networks `trained=(nets, norms)`.

    Raises:
      ConfigError: no `trained`.
    """
    del model, params
    if trained is None:
      raise errors.ConfigError(
          "mend_classifier needs trained=(nets, norms) from the trainer "
          "(evaluation.fever_training.build_mend_classifier).")
    nets, norms = trained
    return MendClassifierState(tuple(jax.tree.map(jnp.asarray, nets)),
                               tuple(jax.tree.map(jnp.asarray, norms)))

  def apply(model, params, requests, state: MendClassifierState):
    """Edits with all `requests` as one joint edit."""
    timer = base.Timer()
    with timer("prepare"):
      batch = tasks.TextClassifierTask(model).edit_batch(requests)
    with timer("edit"):
      ds = _edit(model.config, hp.scale, list(state.nets),
                 list(state.norms), params, batch["tokens"], batch["mask"],
                 batch["labels"][:, 0], batch["weights"][:, 0])
      new_leaves = {p: base.get_leaf(params, p) + d
                    for p, d in zip(targets(model.config), ds)}
      new_params = jax.block_until_ready(tasks.merge(params, new_leaves))
    records = base.leaf_records("mend_classifier",
                                base.request_items(requests), new_leaves)
    return new_params, dataclasses.replace(
        state, edits=np.asarray(int(state.edits) + 1, np.int32)), (
            base.EditInfo(base.describe_changes(params, new_leaves),
                          timer.seconds, records=records))

  return base.FunctionalEditor("mend_classifier", hp, init, apply)


__all__ = ["MendClassifierHParams", "edited_block", "init_nets", "make_loss",
           "mend_classifier", "norm_stats", "targets"]
