"""The regularization family: Fisher kernels, EWC, FT-L, FT+KL, FT."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from keditjax import editors, errors
from keditjax.editors import base, finetune, fisher, tasks
from keditjax.kernels import fisher as K

from conftest import make_tiny_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWN1 = r"^layers_1/mlp/down_proj/kernel$"
REQ = {"prompt": "The mother tongue of {} is", "subject": "Ann",
       "target_new": "Dutch"}
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Paris is the capital of France and a large city in Europe.",
         "Water boils at one hundred degrees Celsius at sea level."] * 4


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.tanh(nn.Dense(16, name="hidden")(x))
    return nn.Dense(5, name="head")(x)


class TinyClassifier:
  """A classifier of the editors' classifier contract (4x4x1 -> 5 classes)."""
  num_classes, image_shape = 5, (4, 4, 1)

  def __init__(self, seed=0):
    self.module = _MLP()
    self.params = self.module.init(jax.random.key(seed),
                                   jnp.zeros((1, 4, 4, 1)))["params"]

  def logits(self, params, images):
    return self.module.apply({"params": params}, images)


def _data(n=24, seed=0):
  rng = np.random.default_rng(seed)
  return {"images": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
          "labels": rng.integers(0, 5, n).astype(np.int32)}


@pytest.fixture(scope="module")
def lm():
  return make_tiny_lm(num_layers=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("KEDITJAX_CACHE", str(tmp_path / "cache"))


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# -- kernels ------------------------------------------------------------------

def _brute_force(task, params, paths, data_batches, labels_for=None):
  """Σ_n (∂ log p_n)² one example at a time, no vmap, in float64."""
  total = {p: 0.0 for p in paths}
  count = 0
  for index, (batch, real) in enumerate(data_batches):
    if labels_for is not None:
      batch = dict(batch, labels=labels_for(index, batch))
    for n in range(real):
      one = {k: jnp.asarray(v[n:n + 1]) for k, v in batch.items()}

      def loglik(sub):
        return tasks.log_likelihood(task.logits(tasks.merge(params, sub), one),
                                    one)[0]
      grads = jax.grad(loglik)({p: base.get_leaf(params, p) for p in paths})
      for p in paths:
        total[p] = total[p] + np.square(np.asarray(grads[p], np.float64))
      count += 1
  return {p: v / count for p, v in total.items()}


def test_empirical_fisher_equals_brute_force_on_a_tiny_lm(lm):
  task = tasks.LanguageModelTask(lm)
  paths = tuple(sorted(tasks.select(lm.params, r"layers_1/mlp/(down|up)_proj")))
  make = lambda: task.text_batches(iter(TEXTS), length=16, examples=6,
                                   batch_size=4)
  got, n = fisher.fisher_diagonal(task, lm.params, paths, make(), chunk=2,
                                  progress=False)
  want = _brute_force(task, lm.params, paths, make())
  assert n == 6 and len(paths) == 2
  for p in paths:
    assert got[p].shape == np.shape(base.get_leaf(lm.params, p))
    assert np.max(want[p]) > 0
    np.testing.assert_allclose(got[p], want[p], rtol=2e-4,
                               atol=1e-6 * np.max(want[p]))


def test_true_fisher_samples_labels_from_the_model():
  model, data = TinyClassifier(), _data()
  task = tasks.ClassifierTask(model)
  paths = tuple(sorted(tasks.select(model.params, "head")))
  make = lambda: task.data_batches(data, batch_size=8)
  got, _ = fisher.fisher_diagonal(task, model.params, paths, make(),
                                  kind="true", seed=3, progress=False)
  # Brute force with the same label draws (the same key sequence).
  keys, rng = [], jax.random.key(3)
  for _ in range(3):
    rng, key = jax.random.split(rng)
    keys.append(key)
  draw = lambda i, b: np.asarray(tasks.sample_labels(
      task.logits(model.params, {k: jnp.asarray(v) for k, v in b.items()}),
      keys[i]))
  want = _brute_force(task, model.params, paths, make(), labels_for=draw)
  for p in paths:
    np.testing.assert_allclose(got[p], want[p], rtol=2e-4, atol=1e-9)
  # Many draws approach the expectation over y ~ p: for the head bias,
  # ∂ log p(y)/∂b = e_y - p, so E_y[(e_y - p)²]_c = p_c (1 - p_c).
  many, _ = fisher.fisher_diagonal(task, model.params, paths, make(),
                                   kind="true", samples=400, progress=False)
  probs = np.asarray(jax.nn.softmax(model.logits(model.params,
                                                 data["images"])))
  exact = np.mean(probs * (1 - probs), axis=0)
  np.testing.assert_allclose(many[("head", "bias")], exact, rtol=0.12)
  empirical, _ = fisher.fisher_diagonal(task, model.params, paths, make(),
                                        progress=False)
  assert not np.allclose(empirical[("head", "bias")], exact, rtol=0.12)


def test_ewc_penalty_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 4), "b": (5,)}
  theta, anchor = ({k: rng.normal(size=s).astype(np.float32)
                    for k, s in shapes.items()} for _ in range(2))
  fish = {k: rng.uniform(0, 2, size=s).astype(np.float32)
          for k, s in shapes.items()}
  lam = 3.5
  want = 0.5 * lam * sum(np.sum(fish[k].astype(np.float64) *
                                (theta[k] - anchor[k]).astype(np.float64) ** 2)
                         for k in shapes)
  got = K.ewc_penalty(theta, anchor, fish, lam)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  auto = jax.jit(jax.grad(K.ewc_penalty))(theta, anchor, fish, lam)
  closed = K.ewc_penalty_grad(theta, anchor, fish, lam)
  for k in shapes:
    ref = lam * fish[k] * (theta[k] - anchor[k])
    np.testing.assert_allclose(auto[k], ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(closed[k], ref, rtol=1e-6)
  assert float(K.ewc_penalty(anchor, anchor, fish, lam)) == 0.0


def test_projection_is_the_linf_ball():
  rng = np.random.default_rng(1)
  theta = {"w": rng.normal(size=(50,)).astype(np.float32)}
  anchor = {"w": np.zeros(50, np.float32)}
  out = K.project_linf(theta, anchor, 0.3)
  np.testing.assert_allclose(out["w"], np.clip(theta["w"], -0.3, 0.3))
  assert K.linf_distance(out, anchor) <= np.float32(0.3)


def test_sharded_fisher_equals_one_device():
  script = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
assert jax.device_count() == 8
from test_finetune import TinyClassifier, _data
from keditjax import sharding
from keditjax.editors import fisher, tasks
model, data = TinyClassifier(), _data(40)
task = tasks.ClassifierTask(model)
paths = tuple(sorted(tasks.select(model.params, ".*")))
make = lambda: task.data_batches(data, batch_size=16)
one, _ = fisher.fisher_diagonal(task, model.params, paths, make(), chunk=2,
                                progress=False, mesh=sharding.make_mesh(1, devices=jax.devices()[:1]))
eight, _ = fisher.fisher_diagonal(task, model.params, paths, make(), chunk=2,
                                  progress=False)
print(json.dumps({"/".join(p): float(np.max(np.abs(one[p] - eight[p])) /
                  np.max(np.abs(one[p]))) for p in paths}))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rel = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(rel) == 4 and max(rel.values()) < 1e-5, rel


def test_fisher_cache_is_used_and_corrupt_files_are_recomputed(tmp_path):
  model, data = TinyClassifier(), _data()
  task = tasks.ClassifierTask(model)
  paths = tuple(sorted(tasks.select(model.params, "head")))
  run = lambda: fisher.fisher_diagonal(
      task, model.params, paths, task.data_batches(data, batch_size=8),
      cache_key={"data": "toy"}, progress=False)
  first, _ = run()
  files = os.listdir(fisher.cache_dir())
  assert len(files) == 1
  calls = []
  original = fisher._step
  fisher._step = lambda *a, **k: calls.append(1) or original(*a, **k)
  try:
    again, _ = run()
    assert not calls  # read from the cache
    with open(os.path.join(fisher.cache_dir(), files[0]), "r+b") as f:
      f.seek(100)
      f.write(b"garbage!")
    with pytest.warns(UserWarning, match="corrupt"):
      third, _ = run()
    assert calls  # recomputed
  finally:
    fisher._step = original
  for p in paths:
    np.testing.assert_array_equal(first[p], again[p])
    np.testing.assert_allclose(first[p], third[p], rtol=1e-6)


# -- editors ------------------------------------------------------------------

def _target_nll(model, params):
  lp = model.score(params, ["The mother tongue of Ann is"], [" Dutch"],
                   reduction="mean")
  return -float(lp[0])


@pytest.mark.parametrize("name", ["ft", "ftl", "ftkl", "ewc"])
def test_every_editor_edits_without_touching_its_input(lm, name):
  kw = {"ftl": dict(radius=0.05), "ewc": dict(fisher_examples=8,
                                              ewc_lambda=10.0),
        "ftkl": dict(kl_examples=4)}.get(name, {})
  editor = editors.get(name, params_regex=DOWN1, lr=1e-2, steps=40, **kw)
  state = editor.init(lm, **editors.select_inputs(editor, dict(
      kl_inputs=TEXTS, fisher_data=TEXTS, progress=False)))
  before = _copy(lm.params)
  new, state2, info = editor.apply(lm, lm.params, [REQ], state)
  jax.tree.map(np.testing.assert_array_equal, lm.params, before)
  # A random tiny model caps its confidence (NLL floor ~4.3 nats).
  assert _target_nll(lm, new) < 0.85 * _target_nll(lm, lm.params)
  assert list(info.changed) == ["layers_1/mlp/down_proj/kernel"]
  # Only the selected leaf moved.
  flat_old = dict(jax.tree_util.tree_flatten_with_path(lm.params)[0])
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
    same = np.array_equal(np.asarray(leaf), np.asarray(flat_old[key_path]))
    assert same == ("down_proj" not in jax.tree_util.keystr(key_path) or
                    "layers_1" not in jax.tree_util.keystr(key_path))
  losses = info.extras["losses"]
  assert len(losses) - info.extras["steps"] in (0, 1)  # + the stopping check
  assert losses[-1] < losses[0]
  assert state2.edits == 1


def test_ftl_never_leaves_its_radius_on_any_step(lm):
  radius = 2e-3
  editor = editors.get("ftl", params_regex=r"layers_\d/mlp/down_proj", lr=0.05,
                       steps=30, radius=radius, stop_loss=0.0)
  state = editor.init(lm)
  new, _, info = editor.apply(lm, lm.params, [REQ], state)
  linf = np.asarray(info.extras["linf"])
  assert len(linf) == 30
  # Float32 rounding of θ₀ + clip(θ − θ₀) may add one ulp of |θ₀|.
  tol = radius + 4 * np.finfo(np.float32).eps * 1.0
  assert np.all(linf <= tol), linf.max()
  assert linf.max() > 0.99 * radius  # the constraint binds
  for path in state.paths:
    delta = np.abs(np.asarray(base.get_leaf(new, path)) -
                   np.asarray(base.get_leaf(lm.params, path)))
    assert delta.max() <= tol
  # The jitted loop compiles once: a second edit reuses it.
  editor.apply(lm, lm.params, [dict(REQ, target_new="Greek")], state)


def _kl_on(lm, params, batch, logp0):
  logits = tasks.LanguageModelTask(lm).logits(params, batch)
  return float(finetune._kl_loss(logits, logp0, batch["weights"]))


def test_ftkl_keeps_unrelated_outputs_closer_than_ft(lm):
  common = dict(params_regex=r"layers_\d/mlp", lr=2e-2, steps=40,
                stop_loss=0.0)
  ftkl = editors.get("ftkl", kl_weight=5.0, kl_examples=4, **common)
  state = ftkl.init(lm, kl_inputs=TEXTS)
  ft = editors.get("ft", **common)
  new_kl, _, _ = ftkl.apply(lm, lm.params, [REQ], state)
  new_ft, _, _ = ft.apply(lm, lm.params, [REQ], ft.init(lm))
  batch, logp0 = state.kl["batch"], state.kl["logp0"]
  assert _kl_on(lm, lm.params, batch, logp0) < 1e-6
  assert _kl_on(lm, new_kl, batch, logp0) < 0.5 * _kl_on(lm, new_ft, batch,
                                                         logp0)


def test_ewc_holds_high_fisher_weights_and_online_ewc_accumulates(lm):
  common = dict(params_regex=DOWN1, lr=2e-2, steps=40, stop_loss=0.0,
                fisher_examples=8)
  ewc = editors.get("ewc", ewc_lambda=1e4, **common)
  state = ewc.init(lm, fisher_data=TEXTS, progress=False)
  ft = editors.get("ft", params_regex=DOWN1, lr=2e-2, steps=40, stop_loss=0.0)
  new_ewc, _, _ = ewc.apply(lm, lm.params, [REQ], state)
  new_ft, _, _ = ft.apply(lm, lm.params, [REQ], ft.init(lm))
  penalty = lambda p: float(K.ewc_penalty(
      {q: base.get_leaf(p, q) for q in state.paths},
      finetune.by_path(state, "anchor"), finetune.by_path(state, "fisher"),
      1.0))
  assert penalty(new_ewc) < 0.5 * penalty(new_ft)
  for anchor in ("latest", "mean"):
    online = editors.get("ewc", ewc_lambda=1e4, online=True, gamma=0.9,
                         online_weight=0.5, online_anchor=anchor, **common)
    s0 = online.init(lm, fisher_data=TEXTS, progress=False)
    p1, s1, _ = online.apply(lm, lm.params, [REQ], s0)
    (path,) = s0.paths
    theta0, theta1 = (np.asarray(base.get_leaf(p, path), np.float64)
                      for p in (lm.params, p1))
    key = "/".join(path)
    f0 = np.asarray(s0.fisher[key], np.float64)
    f_edit = (np.asarray(s1.fisher[key], np.float64) - 0.9 * f0) / 0.5
    assert f_edit.min() >= -1e-6 and f_edit.sum() > 0  # the edit's Fisher
    np.testing.assert_array_equal(s0.anchor[key], theta0)
    if anchor == "latest":  # Schwarz et al.: the edited weights
      np.testing.assert_array_equal(s1.anchor[key], theta1)
    else:  # the minimiser of 0.9 F0 (θ-θ0)² + 0.5 F_e (θ-θ1)²
      want = (0.9 * f0 * theta0 + 0.5 * f_edit * theta1) / (
          0.9 * f0 + 0.5 * f_edit)
      np.testing.assert_allclose(s1.anchor[key], want, rtol=1e-4,
                                 atol=1e-7)


def test_a_custom_optax_optimizer_and_a_classifier():
  model, data = TinyClassifier(), _data()
  editor = finetune.ftl(finetune.FTLHParams(params_regex="head", radius=1.0,
                                            steps=60),
                        optimizer=optax.sgd(0.5))
  state = editor.init(model)
  image = data["images"][0]
  pred = int(np.argmax(model.logits(model.params, image[None])))
  target = (pred + 1) % 5
  new, _, info = editor.apply(model, model.params, [{"image": image,
                                              "label": target}], state)
  assert int(np.argmax(model.logits(new, image[None]))) == target
  assert list(info.changed) == ["head/bias", "head/kernel"]


# -- bad input ----------------------------------------------------------------

def test_bad_input_fails_before_any_work(lm):
  model = TinyClassifier()
  for name, kw in [("ftl", {"radius": 0.0}), ("ftl", {"radius": -1.0}),
                   ("ewc", {"ewc_lambda": 0.0}), ("ftkl", {"kl_weight": -1}),
                   ("ft", {"optimizer": "nope"}), ("ft", {"steps": 0}),
                   ("ewc", {"fisher": "exact"}), ("ft", {"lr": 0.0})]:
    with pytest.raises(errors.ConfigError):
      editors.get(name, **kw)
  with pytest.raises(errors.ConfigError, match="selects no parameter"):
    editors.get("ft", params_regex="^nothing$").init(lm)
  with pytest.raises(errors.ConfigError, match="fisher_data"):
    editors.get("ewc").init(model)
  with pytest.raises(errors.ConfigError, match="kl_inputs"):
    editors.get("ftkl").init(model)
  editor = editors.get("ft", params_regex="head")
  state = editor.init(model)
  image = np.zeros((4, 4, 1), np.float32)
  for bad, match in [({"image": image, "label": 5}, "not a class"),
                     ({"image": image, "label": -1}, "not a class"),
                     ({"image": np.zeros((3, 3, 1)), "label": 1}, "shape"),
                     ({"image": image * np.nan, "label": 1}, "NaN")]:
    with pytest.raises(errors.InputError, match=match):
      editor.apply(model, model.params, [bad], state)
  lm_state = editors.get("ft", params_regex=DOWN1).init(lm)
  with pytest.raises(errors.InputError, match="empty target"):
    editors.get("ft", params_regex=DOWN1).apply(
        lm, lm.params, [dict(REQ, target_new=" ")], lm_state)


def test_stop_on_argmax_stops_as_soon_as_the_edit_holds():
  model, data = TinyClassifier(), _data()
  image = data["images"][1]
  ranked = np.argsort(np.asarray(model.logits(model.params, image[None]))[0])
  edit = [{"image": image, "label": int(ranked[0])}]  # the least likely class
  common = dict(params_regex="head", optimizer="sgd", lr=0.05, steps=500,
                stop_loss=100.0, stop_on="argmax")
  editor = editors.get("ft", **common)
  new, _, info = editor.apply(model, model.params, edit, editor.init(model))
  steps = info.extras["steps"]
  assert 1 < steps < 500
  assert int(np.argmax(model.logits(new, image[None]))) == edit[0]["label"]
  short = editors.get("ft", **dict(common, steps=steps - 1))
  early, _, _ = short.apply(model, model.params, edit, short.init(model))
  assert int(np.argmax(model.logits(early, image[None]))) != edit[0]["label"]
  with pytest.raises(errors.ConfigError, match="stop_on"):
    editors.get("ft", stop_on="never")
  with pytest.raises(errors.ConfigError, match="online_weight"):
    editors.get("ewc", online_weight=0.0)


def test_tradeoff_sweep_monotonicity_and_plot(tmp_path):
  from keditjax.evaluation import tradeoff
  assert tradeoff.parse_values("1e-3, 3e-3") == [1e-3, 3e-3]
  for bad in ("", "0,1", "-1", "a"):
    with pytest.raises(errors.ConfigError):
      tradeoff.parse_values(bad)
  with pytest.raises(errors.ConfigError, match="no strength"):
    tradeoff.sweep(lambda m, o: {}, "ft", [1.0])
  seen = []

  def evaluate(method, overrides):
    seen.append((method, overrides))
    v = next(iter(overrides.values()))
    return {"sr": min(100.0, 40 * v), "dd": v}
  rows = tradeoff.sweep(evaluate, "ftl", [1.0, 2.0, 3.0], progress=False)
  assert seen == [("ftl", {"radius": 1.0}), ("ftl", {"radius": 2.0}),
                  ("ftl", {"radius": 3.0})]
  assert [r["sr"] for r in rows] == [40.0, 80.0, 100.0]
  assert tradeoff.monotonicity(rows) == 1.0
  # A stiffness knob: SR should fall as λ grows; here it rises once.
  ewc = tradeoff.sweep(lambda m, o: {"sr": {1.0: 90, 10.0: 95, 100.0: 50}[
      o["ewc_lambda"]], "dd": 0.0}, "ewc", [1.0, 10.0, 100.0], progress=False)
  assert tradeoff.monotonicity(ewc) == 0.5
  path = tradeoff.plot(rows + ewc, str(tmp_path / "p.png"),
                       chosen={"ftl": 2.0})
  assert os.path.getsize(path) > 1000
