"""MEND: gradient decomposition editor networks (Mitchell et al. 2022).

The fine-tuning gradient of a linear layer `y = x W` on an edit is a sum of
rank-one terms, `∇W = Σ_t x_t δ_tᵀ`, with `x_t` the layer's input and
`δ_t = ∂L/∂y_t` its output gradient at token `t` (MEND, Eq. 2). MEND learns
a small network `g` that maps each pair to `(x̃_t, δ̃_t) = g_ℓ([x_t; δ_t])`
and edits with `W' = W − α_ℓ Σ_t x̃_t δ̃_tᵀ` (Eq. 3-4). Here

  - the edited layers are the MLP output projections of `layers` (Llama
    `down_proj`, GPT-2 `c_proj`, GPT-J `fc_out`: the leaf that writes the
    site `layer/ℓ/mlp/value`, `models.registry.site_param_path`). Their
    input and output are the named sites `layer/ℓ/mlp/key` and
    `layer/ℓ/mlp/value`, so `x_t` is a capture and `δ_t` the gradient of an
    additive zero patch (no hooks);
  - `g` is one low-rank residual MLP shared by all layers,
    `z + W₂ relu(W₁ z + b₁) + b₂` with `W₂ = 0` at init (so an untrained
    MEND is one step of normalised gradient descent), after a per-layer
    scale and shift of the normalised input; `α_ℓ` is learned per layer;
  - inputs are normalised per dimension by statistics of the training edits
    (`norm`, fixed before training; MEND keeps running moments instead);
  - training (`objective`) minimises `c_edit · NLL(edit and paraphrase |
    W') + c_loc · KL(p_W(loc) ‖ p_W'(loc))` (Eq. 5) with the base model
    frozen. The base model's blocks below the first edited layer never
    change, so their output (`hidden`) is computed once per example.

`apply` edits in one forward/backward pass of the base model and one
forward pass of `g`; no optimisation loop.

  editor = mend(MendHParams(checkpoint=workdir))
  state = editor.init(model)                      # or trained=(net, norm)
  new_params, state, info = editor.apply(model, model.params, requests, state)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keditjax import errors
from keditjax.editors import base
from keditjax.models import lm, registry
from keditjax.models import sites as sites_lib


@dataclasses.dataclass(frozen=True)
class MendHParams:
  """MEND's hyper-parameters.

  Attributes:
    checkpoint: a `train_hypernet` workdir holding `editor/` (the trained
      network); `init` also takes the network directly.
    layers: edited blocks (their MLP output projection); None: the last
      three.
    rank: the hidden width of `g`.
    init_lr: the initial per-layer step `α_ℓ`.
  """
  checkpoint: str = ""
  layers: tuple[int, ...] | None = None
  rank: int = 128
  init_lr: float = 1e-4


def default_layers(num_layers: int) -> tuple:
  return tuple(range(max(0, num_layers - 3), num_layers))


DECODERS = ("llama", "gpt2", "gptj")


def kernel_path(config, layer: int) -> tuple:
  """The MLP output projection kernel of block `layer` (`[F, D]`)."""
  return registry.site_param_path(config, f"layer/{layer}/mlp/value")


def check_hparams(hp: MendHParams, config) -> tuple:
  """The validated edit layers (ConfigError before any work)."""
  if config.arch not in DECODERS:
    raise errors.UnsupportedArchitectureError(
        f"MEND edits decoder LMs ({', '.join(DECODERS)}); got {config.arch}.")
  if hp.rank < 1 or not hp.init_lr > 0:
    raise errors.ConfigError(
        f"MEND rank={hp.rank} must be >= 1 and init_lr={hp.init_lr} > 0.")
  layers = hp.layers or default_layers(config.num_layers)
  return base.check_layers(layers, config.num_layers, "mend.layers")


# -- the editor network ---------------------------------------------------

def init_net(rng, *, num_layers: int, in_dim: int, out_dim: int, rank: int,
             init_lr: float) -> dict:
  """`g`'s parameters: shared low-rank MLP, per-layer scale/shift and α."""
  width = in_dim + out_dim
  w1 = jax.random.normal(rng, (width, rank), jnp.float32) / np.sqrt(width)
  return {"w1": w1, "b1": jnp.zeros((rank,)),
          "w2": jnp.zeros((rank, width)), "b2": jnp.zeros((width,)),
          "scale": jnp.ones((num_layers, width)),
          "shift": jnp.zeros((num_layers, width)),
          "lr": jnp.full((num_layers,), init_lr, jnp.float32)}


def transform(net, norm, i: int, x_NxF, d_NxD):
  """`g_ℓ([x; δ])` for layer index `i`: the pseudo-activations and -deltas."""
  f = x_NxF.shape[-1]
  z_NxZ = jnp.concatenate([x_NxF, d_NxD], -1).astype(jnp.float32)
  z_NxZ = (z_NxZ - norm["mean"][i]) / norm["std"][i]
  z_NxZ = z_NxZ * net["scale"][i] + net["shift"][i]
  h_NxR = jax.nn.relu(z_NxZ @ net["w1"] + net["b1"])
  z_NxZ = z_NxZ + h_NxR @ net["w2"] + net["b2"]
  return z_NxZ[:, :f], z_NxZ[:, f:]


def deltas(net, norm, factors) -> list:
  """`ΔW_ℓ = −α_ℓ Σ_t m_t x̃_t δ̃_tᵀ` for every layer's `(x, δ, mask)`."""
  out = []
  for i, (x_BxLxF, d_BxLxD, mask_BxL) in enumerate(factors):
    x_NxF = x_BxLxF.reshape(-1, x_BxLxF.shape[-1])
    d_NxD = d_BxLxD.reshape(-1, d_BxLxD.shape[-1])
    xt_NxF, dt_NxD = transform(net, norm, i, x_NxF, d_NxD)
    xt_NxF = xt_NxF * mask_BxL.reshape(-1, 1)
    out.append(-net["lr"][i] * jnp.einsum("nf,nd->fd", xt_NxF, dt_NxD))
  return out


def edited(config, params, layers, deltas_list):
  """`params` with each layer's MLP output kernel moved by its delta."""
  updates = {}
  for layer, delta in zip(layers, deltas_list):
    path = kernel_path(config, layer)
    kernel = base.get_leaf(params, path)
    updates[path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return base.replace_leaves(params, updates)


# -- the base model's side ------------------------------------------------

def run_rows(config, params, rows, start_layer: int, sites=sites_lib.NO_SITES):
  """Logits at `rows["pos"]` from `rows["hidden"]` (or tokens) onward."""
  hidden = rows.get("hidden")
  logits, out, _ = lm.run(
      config, params, None if hidden is not None else rows["tokens"],
      hidden=hidden, start_layer=start_layer if hidden is not None else 0,
      attention_mask=rows["mask"], logit_positions=rows["pos"], sites=sites)
  return logits.astype(jnp.float32), out


def target_nll(logits_BxPxV, rows):
  """Per-row mean NLL of the target tokens `[B]`, and all-tokens-right."""
  logp = jax.nn.log_softmax(logits_BxPxV, -1)
  picked = jnp.take_along_axis(logp, rows["tgt"][..., None], -1)[..., 0]
  w = rows["w"]
  count = jnp.maximum(w.sum(-1), 1.0)
  nll_B = -(picked * w).sum(-1) / count
  right = (jnp.argmax(logits_BxPxV, -1) == rows["tgt"]) | (w == 0)
  return nll_B, jnp.all(right, -1).astype(jnp.float32)


def factors(config, params, rows, layers, start_layer: int):
  """`[(x, δ, mask)]` per edited layer for the edit loss on `rows`."""
  b, length = rows["mask"].shape
  patches = {f"layer/{l}/mlp/value": sites_lib.Patch(
      jnp.zeros((b, length, config.hidden_size), jnp.float32))
             for l in layers}
  keys = tuple(f"layer/{l}/mlp/key" for l in layers)

  def loss(patches):
    logits, out = run_rows(config, params, rows, start_layer,
                           sites_lib.Sites(patches=patches, capture=keys))
    nll_B, _ = target_nll(logits, rows)
    return nll_B.sum(), out

  grads, out = jax.grad(loss, has_aux=True)(patches)
  mask = rows["mask"].astype(jnp.float32)
  return [(jax.lax.stop_gradient(out[f"layer/{l}/mlp/key"]),
           jax.lax.stop_gradient(grads[f"layer/{l}/mlp/value"].value), mask)
          for l in layers]


def _outcome(net, params, norm, edit, para, loc, *, config, layers,
             start_layer):
  """Per-row NLLs, hits and locality KL after editing with `edit`'s rows.

  `loc` may carry several rows per edit (a `[..., k]` lead): they are
  flattened into one batch, and the KL is their mean.
  """
  loc = {f: v.reshape((-1,) + v.shape[-(2 if f == "hidden" else 1):])
         for f, v in loc.items()}
  new_params = edited(config, params, layers, deltas(
      net, norm, factors(config, params, edit, layers, start_layer)))
  edit_nll, edit_ok = target_nll(
      run_rows(config, new_params, edit, start_layer)[0], edit)
  para_nll, para_ok = target_nll(
      run_rows(config, new_params, para, start_layer)[0], para)
  base_logp = jax.nn.log_softmax(jax.lax.stop_gradient(
      run_rows(config, params, loc, start_layer)[0]), -1)
  new_logp = jax.nn.log_softmax(run_rows(config, new_params, loc,
                                         start_layer)[0], -1)
  kl_BxP = jnp.sum(jnp.exp(base_logp) * (base_logp - new_logp), -1)
  kl_B = jnp.sum(kl_BxP * loc["w"], -1) / jnp.maximum(loc["w"].sum(-1), 1.0)
  return edit_nll, edit_ok, para_nll, para_ok, kl_B


def objective_loss(net, frozen, batch, rng, *, config, layers, start_layer,
                   edit_weight, loc_weight, joint: bool = False):
  """MEND's training loss (Eq. 5) on a batch of edits.

  With `joint=False` every edit is applied alone (vmapped over the batch),
  as single edits are evaluated; `joint=True` applies the batch as one
  edit (the sum of its factors), for batch editing.
  """
  del rng
  params, norm = frozen["lm"], frozen["norm"]
  kw = dict(config=config, layers=layers, start_layer=start_layer)
  rows = (batch["edit"], batch["para"], batch["loc"])
  if joint:
    out = _outcome(net, params, norm, *rows, **kw)
  else:
    one = lambda e, p, l: _outcome(net, params, norm, e, p, l, **kw)
    add_row = lambda r: jax.tree.map(lambda x: x[:, None], r)
    out = jax.vmap(one)(*map(add_row, rows))
    out = jax.tree.map(lambda x: x.reshape(-1), out)
  edit_nll, edit_ok, para_nll, para_ok, kl_B = out
  kl = kl_B.mean()
  nll = 0.5 * (edit_nll.mean() + para_nll.mean())
  loss = edit_weight * nll + loc_weight * kl
  return loss, {"edit_nll": edit_nll.mean(), "para_nll": para_nll.mean(),
                "kl": kl, "edit_acc": edit_ok.mean(),
                "para_acc": para_ok.mean()}


# -- the editor -----------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MendState:
  """The editor network and its input statistics.

  Attributes:
    net: `g`'s parameters (`init_net`).
    norm: `{"mean", "std"}` `[layers, F + D]`.
    layers: the edited blocks (static).
    edits: `apply` calls so far through this state (an int32 array).
  """
  net: Any
  norm: Any
  layers: tuple = dataclasses.field(metadata=dict(static=True))
  edits: Any = dataclasses.field(
      default_factory=lambda: np.asarray(0, np.int32))


def export(directory: str, net, norm, meta: dict) -> None:
  """Writes a trained network as `directory/editor` (orbax) + editor.json."""
  from keditjax import training  # pylint: disable=import-outside-toplevel
  ckpt = training.Checkpointer(os.path.join(directory, "editor"), every=1,
                               keep=1)
  ckpt.save(0, {"net": net, "norm": norm}, dict(meta), force=True)
  ckpt.close()
  if jax.process_index() == 0:  # every process saves its shards above
    with open(os.path.join(directory, "editor.json"), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)


def read_meta(directory: str) -> dict:
  """The `editor.json` that `export` wrote in `directory`.

  Raises:
    CheckpointError: no readable `editor.json`.
  """
  path = os.path.join(directory, "editor.json")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(
        f"no readable MEND editor in {directory} ({e}); train one with "
        "`python -m experiments.train_hypernet --config=...mend...`.") from e
  meta.setdefault("arch", "llama")  # editors exported before GPT-2/GPT-J
  return meta


def network_hparams(hp: MendHParams) -> MendHParams:
  """`hp` with the `rank` and `layers` of the trained network in
  `hp.checkpoint` (its `editor.json`): what the editor edits with, which a
  record of the run must name rather than the class defaults. `hp` itself
  without a checkpoint.

  Raises:
    CheckpointError: `hp.checkpoint` holds no readable `editor.json`.
  """
  if not hp.checkpoint:
    return hp
  meta = read_meta(hp.checkpoint)
  return dataclasses.replace(hp, rank=int(meta["rank"]),
                             layers=tuple(int(l) for l in meta["layers"]))


def load(directory: str, config) -> tuple[dict, dict, dict]:
  """`(net, norm, meta)` exported by `export`, checked against `config`.

  Raises:
    CheckpointError: missing or corrupt files, or a network trained for a
      different model shape.
  """
  from keditjax import training  # pylint: disable=import-outside-toplevel
  meta = read_meta(directory)
  want = {"arch": config.arch, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size,
          "num_layers": config.num_layers}
  for key, value in want.items():
    if meta.get(key) != value:
      raise errors.CheckpointError(
          f"the MEND editor in {directory} was trained for {key}="
          f"{meta.get(key)}, but this model has {value}.")
  width = config.hidden_size + config.intermediate_size
  n, rank = len(meta["layers"]), meta["rank"]
  like = {"net": jax.eval_shape(functools.partial(
      init_net, num_layers=n, in_dim=config.intermediate_size,
      out_dim=config.hidden_size, rank=rank, init_lr=1.0), jax.random.key(0)),
          "norm": {"mean": jax.ShapeDtypeStruct((n, width), jnp.float32),
                   "std": jax.ShapeDtypeStruct((n, width), jnp.float32)}}
  ckpt = training.Checkpointer(os.path.join(directory, "editor"), every=1,
                               keep=1)
  step = ckpt.latest_step()
  if step is None:
    raise errors.CheckpointError(f"{directory}/editor holds no checkpoint.")
  tree, _ = ckpt.restore(step, like, expect={})
  ckpt.close()
  return tree["net"], tree["norm"], meta


def request_rows(model, requests) -> dict:
  """Token rows of `requests` (prompt + target) for `factors`."""
  from keditjax.editors import hypernet_data  # pylint: disable=import-outside-toplevel
  requests = base.make_requests(requests)
  return hypernet_data.rows(model, [(r.text, r.target_new) for r in requests],
                            pad_rows=True)


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _edit(net, norm, params, rows, *, config, layers):
  ds = deltas(net, norm, factors(config, params, rows, layers, 0))
  return edited(config, params, layers, ds)


def mend(hparams: MendHParams = MendHParams()) -> base.FunctionalEditor:
  """The MEND editor (module docstring); `init(model, params, trained=...)`.

  `trained` is `(net, norm)` or a `MendState`; otherwise the network is
  loaded from `hparams.checkpoint`. The editor's `hparams` carry that
  network's `rank` and `layers` (`network_hparams`), so a run records them.

  Raises:
    CheckpointError: `hparams.checkpoint` holds no readable `editor.json`.
  """
  hp = hparams
  if hp.rank < 1 or not hp.init_lr > 0:
    raise errors.ConfigError(
        f"MEND rank={hp.rank} must be >= 1 and init_lr={hp.init_lr} > 0.")

  def init(model, params=None, *, trained=None):
    """The trained network: `trained` (`(net, norm)` or a `MendState`) or
    the one in `hparams.checkpoint`.

    Raises:
      ConfigError: no network, or bad hyper-parameters.
      CheckpointError: an unreadable checkpoint, or one for another model.
    """
    del params
    layers = check_hparams(hp, model.config)
    if isinstance(trained, MendState):
      return trained
    if trained is not None:
      net, norm = trained
    elif hp.checkpoint:
      net, norm, meta = load(hp.checkpoint, model.config)
      layers = tuple(meta["layers"])
    else:
      raise errors.ConfigError(
          "MEND needs a trained editor network: set mend.checkpoint to a "
          "train_hypernet workdir, or pass trained=(net, norm) to init.")
    return MendState(jax.tree.map(jnp.asarray, net),
                     jax.tree.map(jnp.asarray, norm), tuple(layers))

  def apply(model, params, requests, state: MendState):
    """Edits with all `requests` as one joint edit (the sum of their
    factors); each request's record names the edited kernels."""
    timer = base.Timer()
    with timer("rows"):
      rows = request_rows(model, requests)
    with timer("edit"):
      new_params = _edit(state.net, state.norm, params, rows,
                         config=model.config, layers=state.layers)
      jax.block_until_ready(new_params)
    paths = {kernel_path(model.config, l): base.get_leaf(
        new_params, kernel_path(model.config, l)) for l in state.layers}
    info = base.EditInfo(changed=base.describe_changes(params, paths),
                         seconds=timer.seconds,
                         extras={"layers": list(state.layers)},
                         records=base.leaf_records(
                             "mend", base.make_requests(requests), paths))
    return new_params, dataclasses.replace(
        state, edits=np.asarray(int(state.edits) + 1, np.int32)), info

  # The recorded hparams name the loaded network's rank and layers.
  return base.FunctionalEditor("mend", network_hparams(hp), init, apply)


__all__ = ["DECODERS", "MendHParams", "MendState", "deltas", "edited",
           "export", "kernel_path", "network_hparams", "read_meta",
           "factors", "init_net", "load", "mend", "objective_loss",
           "target_nll", "transform"]
