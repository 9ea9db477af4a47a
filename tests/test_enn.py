"""Editable training (ENN): the unrolled editor, the objective, the editor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from keditjax import editors, errors
from keditjax.editors import enn
from keditjax.evaluation import enn_training
from keditjax.models import cnn

HEAD = (("head", "kernel"),)


def mlp_params(seed=0, d=6, h=5, k=4):
  r = np.random.default_rng(seed)
  return {"hidden": {"kernel": r.normal(size=(d, h)) / np.sqrt(d),
                     "bias": np.zeros(h)},
          "head": {"kernel": r.normal(size=(h, k)) / np.sqrt(h),
                   "bias": np.zeros(k)}}


def mlp_logits(params, x_BxD):
  h = jnp.tanh(x_BxD @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def blobs(seed, n, d=6, k=4):
  """Four Gaussian classes in d dims."""
  r = np.random.default_rng(seed)
  centres = np.random.default_rng(123).normal(size=(k, d)) * 1.5
  y = r.integers(k, size=n)
  return (centres[y] + r.normal(size=(n, d))).astype(np.float32), y


def meta_batch(seed, n=16, edits=4, d=6, k=4, use_random=True):
  x, y = blobs(seed, n + edits, d, k)
  return {"images": x[:n], "labels": y[:n].astype(np.int32),
          "edit_images": x[n:], "edit_true": y[n:].astype(np.int32),
          "edit_random": ((y[n:] + 1) % k).astype(np.int32),
          "edit_use_random": np.full(edits, use_random)}


def f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_unrolled_edit_is_hand_unrolled_sgd():
  with jax.enable_x64(True):
    params = f64(mlp_params())
    x, y = blobs(1, 2)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray((y + 1) % 4)
    w = jnp.ones(2)
    lr, margin = 0.1, 5.0

    def loss(kernel):
      p = {**params, "head": {**params["head"], "kernel": kernel}}
      return jnp.mean(enn.edit_loss_rows(mlp_logits(p, x), y, margin))

    kernel = params["head"]["kernel"]
    for _ in range(3):
      kernel = kernel - lr * jax.grad(loss)(kernel)
    edited, losses = enn.unrolled_edit(mlp_logits, params, HEAD, x, y, w,
                                       steps=3, lr=lr, margin=margin)
  assert np.all(np.asarray(losses) > 0)  # no early stop: all three applied
  np.testing.assert_allclose(edited["head"]["kernel"], kernel, rtol=1e-12)
  np.testing.assert_array_equal(edited["hidden"]["kernel"],
                                params["hidden"]["kernel"])


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_meta_gradient_matches_finite_differences(optimizer):
  """d/dθ of the whole objective, through 3 inner steps, vs central
  differences along random directions (float64)."""
  with jax.enable_x64(True):
    params = f64(mlp_params(2))
    batch = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) if a.dtype == np.float32 else a,
        meta_batch(3))
    lr = 0.05 if optimizer == "sgd" else 0.01
    paths = (("hidden", "kernel"), ("head", "kernel"))
    objective = lambda p: enn.meta_loss(
        mlp_logits, p, batch, paths=paths, steps=3, lr=lr, margin=5.0,
        optimizer=optimizer, c_edit=1.0, c_loc=2.0)
    (value, metrics), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True))(params)
    assert float(metrics["edit_loss"]) > 0  # the inner loop never stopped
    assert float(metrics["loc_kl"]) > 0
    rng = np.random.default_rng(0)
    loss_only = jax.jit(lambda p: objective(p)[0])
    for _ in range(3):
      v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
      eps = 1e-5
      plus = loss_only(jax.tree.map(lambda a, b: a + eps * b, params, v))
      minus = loss_only(jax.tree.map(lambda a, b: a - eps * b, params, v))
      numeric = float(plus - minus) / (2 * eps)
      analytic = float(sum(jnp.vdot(g, d) for g, d in zip(
          jax.tree.leaves(grads), jax.tree.leaves(v))))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    # The inner steps matter: the gradient is not the one at θ_0 alone.
    zero_steps = jax.jit(jax.grad(lambda p: enn.meta_loss(
        mlp_logits, p, batch, paths=paths, steps=1, lr=1e-12, margin=5.0,
        optimizer=optimizer, c_edit=1.0, c_loc=2.0)[0]))(params)
    assert not np.allclose(grads["hidden"]["kernel"],
                           zero_steps["hidden"]["kernel"], atol=1e-4)


def test_zero_weights_give_the_base_loss():
  params = mlp_params(4)
  batch = meta_batch(5, use_random=False)
  loss = lambda p: enn.meta_loss(mlp_logits, p, batch, paths=HEAD, steps=2,
                                 lr=0.1, c_edit=0.0, c_loc=0.0,
                                 label_smoothing=0.1)[0]
  base = lambda p: optax.softmax_cross_entropy(
      mlp_logits(p, batch["images"]), optax.smooth_labels(
          jax.nn.one_hot(batch["labels"], 4), 0.1)).mean()
  np.testing.assert_allclose(jax.jit(loss)(params), base(params), rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-7),
               jax.jit(jax.grad(loss))(params), jax.grad(base)(params))


def test_flip_labels_runner_up_and_random():
  logits = jnp.array([[5.0, 4.0, 1.0], [0.0, 3.0, 2.0]])
  labels = enn.flip_labels(logits, jnp.array([0, 1]), jnp.array([2, 0]),
                           jnp.array([False, True]))
  np.testing.assert_array_equal(labels, [1, 0])


def test_short_meta_training_makes_edits_easier():
  """A few dozen outer steps lower l_e after k editor steps on held-out
  edits (the meta-trained model is easier to edit than where it started)."""
  params = mlp_params(6)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  base_step = jax.jit(lambda p, s, x, y: _adam_step(
      tx, lambda q: optax.softmax_cross_entropy_with_integer_labels(
          mlp_logits(q, x), y).mean(), p, s))
  for i in range(150):  # a base classifier first
    x, y = blobs(100 + i, 32)
    params, opt_state = base_step(params, opt_state, x, y)
  hp = dict(paths=HEAD, steps=2, lr=0.05, margin=1.0, c_edit=3.0, c_loc=1.0)
  meta = jax.jit(lambda p, s, b: _adam_step(
      tx, lambda q: enn.meta_loss(mlp_logits, q, b, **hp)[0], p, s))
  held_out = meta_batch(999, n=64, edits=32, use_random=True)
  measure = jax.jit(lambda p: enn.meta_loss(mlp_logits, p, held_out, **hp)[1])
  before = measure(params)
  opt_state = tx.init(params)
  for i in range(40):
    params, opt_state = meta(params, opt_state, meta_batch(i, edits=8))
  after = measure(params)
  assert float(after["edit_loss"]) < 0.85 * float(before["edit_loss"])
  assert float(after["accuracy"]) > 0.6


def _adam_step(tx, loss_fn, params, opt_state):
  grads = jax.grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


class _Edit:
  def __init__(self, image, label):
    self.image, self.label, self.case_id = image, label, None


def test_editor_changes_only_the_selected_leaf_and_keeps_inputs():
  classifier = cnn.init_classifier(cnn.ClassifierConfig(image_shape=(8, 8, 1)))
  params = classifier.params
  before = jax.tree.map(lambda a: np.array(a, copy=True), params)
  image = np.random.default_rng(0).random((8, 8, 1)).astype(np.float32)
  predicted = int(classifier.predict(params, image[None])[0])
  label = (predicted + 1) % 10
  editor = editors.get("enn", lr=0.5, margin=0.5, max_steps=200)
  with pytest.raises(errors.ConfigError, match="kl_inputs"):
    editor.init(classifier, params, kl_inputs=None)
  state = editor.init(classifier, params)
  new_params, new_state, info = editor.apply(classifier, params,
                                             [_Edit(image, label)], state)
  jax.tree.map(np.testing.assert_array_equal, params, before)
  assert int(classifier.predict(new_params, image[None])[0]) == label
  assert info.extras["held"] and info.extras["steps"] >= 1
  assert sorted(info.changed) == ["dense1/kernel"]
  assert new_state.edits == 1 and state.edits == 0
  for path in ("conv1", "conv2", "head"):
    for leaf in ("kernel", "bias"):
      assert new_params[path][leaf] is params[path][leaf]
  assert new_params["dense1"]["bias"] is params["dense1"]["bias"]
  assert not np.allclose(new_params["dense1"]["kernel"],
                         params["dense1"]["kernel"])
  # An edit that already holds takes no step and changes nothing.
  again, _, info2 = editor.apply(classifier, new_params,
                                 {"image": image, "label": label}, new_state)
  assert info2.extras["steps"] == 0
  np.testing.assert_array_equal(again["dense1"]["kernel"],
                                new_params["dense1"]["kernel"])


@pytest.mark.parametrize("overrides", [
    {"inner_steps": 0}, {"max_steps": 0}, {"lr": 0.0}, {"lr": -1e-3},
    {"params_regex": "no_such_layer"}, {"params_regex": "dense1["},
    {"optimizer": "adam"}, {"margin": -1.0}])
def test_bad_hparams_raise_config_error(overrides):
  with pytest.raises(errors.ConfigError):
    editors.get("enn", **overrides)


def test_the_recipe_refuses_a_bad_config():
  from experiments.configs import enn_cnn_mnist
  config = enn_cnn_mnist.get_config()
  config.inner_lr = 0.0
  with pytest.raises(errors.ConfigError, match="inner_lr"):
    enn_training.build(config)


def test_the_recipe_on_digits_with_the_shared_trainer(tmp_path):
  """The contract: fixed-shape deterministic batches, a jittable loss, and
  a short `training.train` run that lowers the post-edit edit loss."""
  from experiments.configs import enn_cnn_mnist
  from keditjax import training
  config = enn_cnn_mnist.get_config()
  config.dataset = "digits"
  config.cache_dir = str(tmp_path)
  config.base.train_steps = 150
  config.base.lr = 3e-3
  config.batch_size, config.edits_per_step = 32, 4
  config.valid_holdout, config.valid_batches = 200, 2
  config.inner_steps, config.inner_lr = 2, 0.003
  config.c_edit = 3.0
  objective, batch_fn, valid = enn_training.build(config)
  first = batch_fn(3)
  jax.tree.map(np.testing.assert_array_equal, first, batch_fn(3))
  assert {k: v.shape for k, v in first.items()} == {
      k: v.shape for k, v in batch_fn(4).items()}
  config.train.update(steps=30, learning_rate=1e-3, eval_every=30,
                      log_every=30, progress=False,
                      tensorboard=False)
  params0 = objective.init(jax.random.key(0))
  measure = jax.jit(lambda p, b: objective.loss(p, objective.frozen, b,
                                                None)[1])
  before = np.mean([float(measure(params0, b)["edit_loss"]) for b in valid])
  result = training.train(objective, config.train, batch_fn=batch_fn,
                          valid_batches=valid, workdir=None)
  after = np.mean([float(measure(result.params, b)["edit_loss"])
                   for b in valid])
  assert before > 0 and after < 0.9 * before
