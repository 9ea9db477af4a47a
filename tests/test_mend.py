"""MEND: the factorised gradient, the editor network, training and the editor."""

import json

import jax
import numpy as np
import pytest

from keditjax import editors, errors, training
from keditjax.editors import hypernet_data, mend
from keditjax.evaluation import hypernet
from keditjax.models import tiny

from experiments.configs import mend_tiny_synthetic


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm(embed_std=0.25)


def _rows(model):
  pairs = [("Kalomi lives in", "Paris"), ("Zetano speaks", "Greek"),
           ("Rupoka plays the", "harp")]
  return hypernet_data.rows(model, pairs)


def _untrained(model, num_layers: int, init_lr: float):
  """(net, norm): an untrained rank-4 network and identity normalisation."""
  width = model.config.hidden_size + model.config.intermediate_size
  norm = {"mean": np.zeros((num_layers, width), np.float32),
          "std": np.ones((num_layers, width), np.float32)}
  net = mend.init_net(jax.random.key(0), num_layers=num_layers,
                      in_dim=model.config.intermediate_size,
                      out_dim=model.config.hidden_size, rank=4,
                      init_lr=init_lr)
  return net, norm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_factors_are_the_kernel_gradient(model, arch):
  """Σ_t x_t δ_tᵀ equals jax.grad of the target NLL w.r.t. the MLP output
  kernel (Llama down_proj, GPT-2 c_proj)."""
  if arch != "llama":
    model = tiny.tiny_lm(arch=arch, embed_std=0.25)
  config, layers = model.config, (1, 3)
  rows = _rows(model)
  fs = mend.factors(config, model.params, rows, layers, 0)
  paths = [mend.kernel_path(config, l) for l in layers]
  assert paths[0][-2] == {"llama": "down_proj", "gpt2": "c_proj"}[arch]

  def nll(kernels):
    params = model.params
    for l, p, k in zip(layers, paths, kernels):
      params = mend.edited(config, params, (l,),
                           [k - editors.base.get_leaf(params, p)])
    logits, _ = mend.run_rows(config, params, rows, 0)
    return mend.target_nll(logits, rows)[0].sum()

  kernels = [editors.base.get_leaf(model.params, p) for p in paths]
  grads = jax.grad(nll)(kernels)
  for (x, d, m), g in zip(fs, grads):
    outer = np.einsum("blf,bld->fd", np.asarray(x) * np.asarray(m)[..., None],
                      np.asarray(d))
    assert np.abs(outer).max() > 1e-6  # not trivially zero
    np.testing.assert_allclose(outer, np.asarray(g), rtol=2e-4, atol=1e-6)
  # Starting from the cached prefix gives the same factors.
  rows_h = dict(rows, hidden=hypernet_data.prefix_hidden(
      model, model.params, rows, 1, progress=False))
  fs_h = mend.factors(config, model.params, rows_h, layers, 1)
  for a, b in zip(fs, fs_h):
    np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[1]), rtol=1e-4,
                               atol=1e-7)


def test_delta_matches_numpy():
  rng = np.random.RandomState(0)
  f, d, r, n = 6, 4, 3, 5
  net = {k: np.asarray(v) for k, v in mend.init_net(
      jax.random.key(1), num_layers=2, in_dim=f, out_dim=d, rank=r,
      init_lr=0.1).items()}
  net["w2"] = rng.randn(r, f + d).astype(np.float32)
  net["scale"] = rng.rand(2, f + d).astype(np.float32) + 0.5
  net["shift"] = rng.randn(2, f + d).astype(np.float32)
  net["lr"] = np.asarray([0.1, 0.2], np.float32)
  norm = {"mean": rng.randn(2, f + d).astype(np.float32),
          "std": rng.rand(2, f + d).astype(np.float32) + 0.5}
  x = rng.randn(1, n, f).astype(np.float32)
  dd = rng.randn(1, n, d).astype(np.float32)
  mask = np.asarray([[1, 1, 1, 0, 1]], np.float32)
  got = mend.deltas(net, norm, [(x, dd, mask), (x, dd, mask)])
  for i in range(2):
    z = (np.concatenate([x[0], dd[0]], -1) - norm["mean"][i]) / norm["std"][i]
    z = z * net["scale"][i] + net["shift"][i]
    z = z + np.maximum(z @ net["w1"] + net["b1"], 0) @ net["w2"] + net["b2"]
    want = -net["lr"][i] * (z[:, :f] * mask[0][:, None]).T @ z[:, f:]
    np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-4,
                               atol=1e-5)


def test_untrained_mend_is_one_normalised_gradient_step(model):
  """At init (W₂ = 0, no shift), with mean 0 / std 1, ΔW = −α ∇W."""
  layers = (3,)
  rows = _rows(model)
  fs = mend.factors(model.config, model.params, rows, layers, 0)
  net, norm = _untrained(model, 1, 0.5)
  (delta,) = mend.deltas(net, norm, fs)
  x, d, m = fs[0]
  grad = np.einsum("blf,bld->fd", np.asarray(x) * np.asarray(m)[..., None],
                   np.asarray(d))
  np.testing.assert_allclose(np.asarray(delta), -0.5 * grad, rtol=1e-4,
                             atol=1e-7)


def _train_tiny(workdir, model: str, steps: int, eval_every: int):
  """(result, the untrained network's validation loss): tiny MEND trained
  into `workdir` and exported."""
  c = mend_tiny_synthetic.get_config()
  c.model = model
  c.train.steps, c.train.eval_every, c.train.progress = steps, eval_every, False
  recipe = hypernet.build(c)
  result = training.train(recipe.objective, c.train, batch_fn=recipe.batch_fn,
                          valid_batches=recipe.valid_batches,
                          workdir=str(workdir))
  recipe.finish(result, str(workdir))
  loss = jax.jit(recipe.objective.loss)
  untrained = np.mean([loss(recipe.objective.init(jax.random.key(0)),
                            recipe.objective.frozen, b, None)[0]
                       for b in recipe.valid_batches])
  return result, float(untrained)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mend_tiny")
  result, untrained = _train_tiny(workdir, "tiny", 120, 40)
  return workdir, result, untrained


def test_training_lowers_the_validation_loss(trained):
  _, result, untrained = trained
  valid = [r for r in result.history if r["split"] == "valid"]
  assert len(valid) == 3
  assert min(r["loss"] for r in valid) < 0.75 * untrained
  rows = training.read_metrics(str(trained[0]))
  assert {"edit_nll", "para_nll", "kl", "grad_norm"} <= set(rows[0])


def test_editor_applies_in_one_pass_and_changes_only_its_layers(trained):
  workdir = trained[0]
  model = hypernet.load_model("tiny")
  editor = editors.get("mend", checkpoint=str(workdir))
  state = editor.init(model)
  assert state.layers == (2, 3)
  before = jax.tree.map(np.array, model.params)
  request = {"prompt": "{} lives in", "subject": "Kalomi", "target_new": "Oslo"}
  new_params, state, info = editor.apply(model, model.params, [request], state)
  jax.tree.map(np.testing.assert_array_equal, before, model.params)
  assert sorted(info.changed) == ["layers_2/mlp/down_proj/kernel",
                                  "layers_3/mlp/down_proj/kernel"]
  flat_old = dict(jax.tree_util.tree_flatten_with_path(model.params)[0])
  flat_new = dict(jax.tree_util.tree_flatten_with_path(new_params)[0])
  changed = [jax.tree_util.keystr(k) for k in flat_old
             if not np.array_equal(flat_old[k], flat_new[k])]
  assert len(changed) == 2 and all("down_proj" in k for k in changed)
  # The edit raises the target's probability.
  p_old = model.score(model.params, ["Kalomi lives in"], [" Oslo"])
  p_new = model.score(new_params, ["Kalomi lives in"], [" Oslo"])
  assert p_new[0] > p_old[0]


def test_editor_refuses_a_network_of_another_model(trained, tmp_path):
  workdir = trained[0]
  other = tiny.tiny_lm(hidden_size=32, intermediate_size=64)
  editor = editors.get("mend", checkpoint=str(workdir))
  with pytest.raises(errors.CheckpointError, match="hidden_size"):
    editor.init(other)
  with pytest.raises(errors.CheckpointError, match="no readable MEND"):
    editors.get("mend", checkpoint=str(tmp_path)).init(other)
  with pytest.raises(errors.ConfigError, match="trained editor"):
    editors.get("mend").init(other)
  with pytest.raises(errors.ConfigError):
    editors.get("mend", rank=0)
  meta = json.loads((workdir / "editor.json").read_text())
  assert meta["layers"] == [2, 3] and meta["rank"] == 16


def test_editor_hparams_name_the_loaded_network(tmp_path):
  """A run's recorded hparams are the network's rank and layers (from its
  editor.json), not the class defaults (rank 128, layers None)."""
  (tmp_path / "editor.json").write_text(json.dumps(
      {"method": "mend", "arch": "llama", "layers": [27, 28, 29],
       "rank": 256}))
  editor = editors.get("mend", checkpoint=str(tmp_path))
  assert (editor.hparams.rank, editor.hparams.layers) == (256, (27, 28, 29))
  assert mend.network_hparams(mend.MendHParams()) == mend.MendHParams()
  with pytest.raises(errors.CheckpointError, match="no readable MEND"):
    editors.get("mend", checkpoint=str(tmp_path / "missing"))


def test_single_and_joint_objectives(model):
  """One edit: both objectives agree; several: single edits are independent."""
  import functools
  layers = (2, 3)
  triples = hypernet_data.synthetic_triples(3, seed=1)
  sets = [hypernet_data.rows(model, [t[i] for t in triples], length=48,
                             targets=12) for i in range(3)]
  batch = dict(zip(("edit", "para", "loc"), sets))
  net, norm = _untrained(model, 2, 0.5)
  frozen = {"lm": model.params, "norm": norm}
  loss = lambda joint, b: functools.partial(
      mend.objective_loss, config=model.config, layers=layers, start_layer=0,
      edit_weight=1.0, loc_weight=1.0, joint=joint)(net, frozen, b, None)
  first = jax.tree.map(lambda x: x[:1], batch)
  np.testing.assert_allclose(loss(True, first)[0], loss(False, first)[0],
                             rtol=1e-5)
  # Single edits: the batch loss is the mean of the one-edit losses.
  each = [loss(False, jax.tree.map(lambda x, i=i: x[i:i + 1], batch))[0]
          for i in range(3)]
  np.testing.assert_allclose(loss(False, batch)[0], np.mean(each), rtol=1e-5)
  assert not np.isclose(loss(True, batch)[0], np.mean(each), rtol=1e-3)


def test_gpt2_mend_trains_and_edits_c_proj(tmp_path):
  """The same recipe on a GPT-2 (MLP output `c_proj`): training lowers the
  validation loss, the editor moves only the c_proj kernels, and a network
  trained for GPT-2 is refused by a Llama of the same shape."""
  result, untrained = _train_tiny(tmp_path, "tiny-gpt2", 60, 30)
  valid = [r["loss"] for r in result.history if r["split"] == "valid"]
  assert min(valid) < 0.9 * untrained
  model = hypernet.load_model("tiny-gpt2")
  editor = editors.get("mend", checkpoint=str(tmp_path))
  state = editor.init(model)
  request = {"prompt": "{} lives in", "subject": "Kalomi", "target_new": "Oslo"}
  new_params, _, info = editor.apply(model, model.params, [request], state)
  assert sorted(info.changed) == ["h_2/mlp/c_proj/kernel",
                                  "h_3/mlp/c_proj/kernel"]
  p_old = model.score(model.params, ["Kalomi lives in"], [" Oslo"])
  p_new = model.score(new_params, ["Kalomi lives in"], [" Oslo"])
  assert p_new[0] > p_old[0]
  with pytest.raises(errors.CheckpointError, match="arch"):
    editor.init(hypernet.load_model("tiny"))


def test_with_locality_cycles_or_truncates_the_locality_pairs():
  e, p = ("a", "x"), ("b", "x")
  l1, l2, l3 = ("c", "y"), ("d", "z"), ("f", "w")
  got = hypernet_data.with_locality([(e, p, l1), (e, p, l1, l2, l3)], 2)
  assert got == [(e, p, l1, l1), (e, p, l1, l2)]
  with pytest.raises(errors.ConfigError, match="loc_per_edit"):
    hypernet_data.with_locality([(e, p, l1)], 0)


@pytest.mark.parametrize("joint", [False, True])
def test_several_locality_rows_per_edit_average_their_kl(model, joint):
  """loc rows `[B, k, ...]`: the KL is the mean of the k one-row KLs."""
  import functools
  layers = (2, 3)
  triples = hypernet_data.synthetic_triples(6, seed=2)
  edit = hypernet_data.rows(model, [t[0] for t in triples[:3]], length=48,
                            targets=12)
  para = hypernet_data.rows(model, [t[1] for t in triples[:3]], length=48,
                            targets=12)
  locs = [hypernet_data.rows(model, [t[2] for t in triples[j::2][:3]],
                             length=48, targets=12) for j in (0, 1)]
  net, norm = _untrained(model, 2, 500.0)
  run = functools.partial(
      mend.objective_loss, net, {"lm": model.params, "norm": norm}, rng=None,
      config=model.config, layers=layers, start_layer=0, edit_weight=1.0,
      loc_weight=1.0, joint=joint)
  each = [run({"edit": edit, "para": para, "loc": loc})[1]["kl"]
          for loc in locs]
  both = {f: np.stack([locs[0][f], locs[1][f]], 1) for f in locs[0]}
  got = run({"edit": edit, "para": para, "loc": both})[1]["kl"]
  assert min(each) > 1e-4 and not np.isclose(each[0], each[1], rtol=1e-3)
  np.testing.assert_allclose(got, np.mean(each), rtol=1e-4)
