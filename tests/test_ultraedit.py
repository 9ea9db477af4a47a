"""UltraEdit: the lifelong normaliser and the ridge update against NumPy, and
the editor on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.editors import base, mend, ultraedit
from keditjax.models import tiny

REQUESTS = [{"prompt": f"Name{i} lives in", "subject": f"Name{i}",
             "target_new": f"city{i}"} for i in range(6)]


def _np_turn(k, g, w, seen, lr, ridge, eps):
  """NumPy reference of one layer's turn: `seen` holds every earlier valid
  row of [k; g]; returns (ΔW, seen after)."""
  z = np.concatenate([k, g], -1).astype(np.float64)
  valid = w > 0
  seen = np.concatenate([seen, z[valid]], 0)
  mu, sd = seen.mean(0), seen.std(0, ddof=1)
  zh = (z[valid] - mu) / (sd + eps)
  f = k.shape[-1]
  kh, gh = zh[:, :f], zh[:, f:]
  v = -lr * (kh ** 2).sum(-1, keepdims=True) * gh
  kv = k[valid].astype(np.float64)
  delta = np.linalg.solve(kv.T @ kv + ridge * np.eye(f), kv.T @ v)
  return delta, seen


def test_turns_match_numpy_and_carry_the_normaliser():
  rng = np.random.default_rng(0)
  f, d = 6, 4
  count, mean, m2 = jnp.zeros(()), jnp.zeros(f + d), jnp.zeros(f + d)
  seen = np.zeros((0, f + d))
  for t, n in enumerate((9, 5, 12)):  # turns of different sizes and scales
    k = rng.normal(2.0 + t, 1.0 + t, (n, f)).astype(np.float32)
    g = rng.normal(-1.0, 0.1 * (t + 1), (n, d)).astype(np.float32)
    w = (rng.random(n) > 0.3).astype(np.float32)
    w[:2] = 1.0
    delta, (count, mean, m2) = ultraedit.turn(
        jnp.asarray(k), jnp.asarray(g), jnp.asarray(w), count, mean, m2,
        lr=0.05, ridge=1.0, eps=1e-6)
    want, seen = _np_turn(k, g, w, seen, 0.05, 1.0, 1e-6)
    # The normaliser after this turn is the statistics of *all* rows so far.
    assert float(count) == len(seen)
    np.testing.assert_allclose(mean, seen.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(m2 / (count - 1)), seen.std(0, ddof=1),
                               rtol=1e-4)
    np.testing.assert_allclose(delta, want, rtol=2e-3, atol=1e-6)


def test_reference_batch_variance_overcount_is_not_ours():
  """The reference adds n_b·var_unbiased(batch): after two turns its σ is
  not the standard deviation of what it saw; ours is."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 3)), rng.normal(3.0, 2.0, size=(3, 3))
  # The reference's recursion (RunningMeanStd.update), in NumPy.
  n, mu, var = 0.0, np.zeros(3), np.zeros(3)
  for x in (a, b):
    nn = n + len(x)
    delta = x.mean(0) - mu
    mu = mu + len(x) * delta / nn
    var = var + len(x) * x.var(0, ddof=1) + n * len(x) * delta ** 2 / nn
    n = nn
  ref_std = np.sqrt(var / (n - 1))
  true_std = np.concatenate([a, b]).std(0, ddof=1)
  assert np.all(ref_std > true_std * 1.01)  # the over-count
  c, m, s = jnp.zeros(()), jnp.zeros(3), jnp.zeros(3)
  for x in (a, b):
    c, m, s = ultraedit.update_stats(c, m, s, jnp.asarray(x, jnp.float32),
                                     jnp.ones(len(x)))
  np.testing.assert_allclose(np.sqrt(s / (c - 1)), true_std, rtol=1e-5)


def test_zero_weight_rows_change_nothing():
  rng = np.random.default_rng(2)
  k = rng.normal(size=(5, 4)).astype(np.float32)
  g = rng.normal(size=(5, 3)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 0], np.float32)
  zero = (jnp.zeros(()), jnp.zeros(7), jnp.zeros(7))
  d1, s1 = ultraedit.turn(k, g, w, *zero, lr=0.1, ridge=1.0, eps=1e-6)
  d2, s2 = ultraedit.turn(k[w > 0], g[w > 0], np.ones(3, np.float32), *zero,
                          lr=0.1, ridge=1.0, eps=1e-6)
  np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-7)
  for x, y in zip(s1, s2):
    np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm()


def _nll(model, params, requests):
  rows = mend.request_rows(model, requests)
  logits, _ = mend.run_rows(model.config, params, rows, 0)
  nll, _ = mend.target_nll(logits, rows)
  real = np.asarray(rows["w"]).sum(-1) > 0
  return float(np.asarray(nll)[real].mean())


def test_editor_applies_the_turn_to_the_output_projections(model):
  layers = (2, 3)
  editor = editors.get("ultraedit", layers=layers, lr=0.5)
  state = editor.init(model)
  new_params, state2, info = editor.apply(model, model.params, REQUESTS[:3],
                                          state)
  # The same turn computed by hand from the captured keys and gradients.
  rows = mend.request_rows(model, base.make_requests(REQUESTS[:3]))
  w = ultraedit.token_weights(rows, "all").reshape(-1)
  facts = mend.factors(model.config, model.params, rows, layers, 0)
  for i, (k, g, _) in enumerate(facts):
    delta, (c, m, s) = ultraedit.turn(
        k.reshape(-1, k.shape[-1]), g.reshape(-1, g.shape[-1]), w,
        state.count[i], state.mean[i], state.m2[i], lr=0.5, ridge=1.0,
        eps=1e-6)
    path = mend.kernel_path(model.config, layers[i])
    got = base.get_leaf(new_params, path) - base.get_leaf(model.params, path)
    np.testing.assert_allclose(got, delta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state2.count[i], c)
    assert float(c) == w.sum()
  assert len(info.records) == 3 and int(state2.edits) == 1
  # Nothing else moved.
  moved = {"/".join(mend.kernel_path(model.config, l)) for l in layers}
  flat0 = jax.tree_util.tree_flatten_with_path(model.params)[0]
  flat1 = jax.tree_util.tree_flatten_with_path(new_params)[0]
  for (path, a), (_, b) in zip(flat0, flat1):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name not in moved:
      np.testing.assert_array_equal(a, b)
  # A second turn starts from the first turn's statistics.
  _, state3, _ = editor.apply(model, new_params, REQUESTS[3:], state2)
  assert float(state3.count[0]) > float(state2.count[0])


def test_edit_lowers_the_target_loss_and_answer_tokens_are_fewer(model):
  editor = editors.get("ultraedit", layers=(2, 3), lr=0.5)
  before = _nll(model, model.params, REQUESTS)
  params, _, _ = editor.apply(model, model.params, REQUESTS,
                              editor.init(model))
  assert _nll(model, params, REQUESTS) < before - 0.05
  rows = mend.request_rows(model, base.make_requests(REQUESTS))
  ans = ultraedit.token_weights(rows, "answer")
  every = ultraedit.token_weights(rows, "all")
  assert 0 < ans.sum() < every.sum()
  assert np.all(every[ans > 0] == 1)  # answer positions are real tokens


def test_bad_hparams_are_config_errors(model):
  for bad in (dict(tokens="some"), dict(lr=0.0), dict(ridge=-1.0),
              dict(layers=(99,))):
    with pytest.raises(errors.ConfigError):
      editors.get("ultraedit", **bad).init(model)


def test_records_hold_each_requests_low_rank_share(model, tmp_path):
  """Each request's record declares factors (u = its keys, v = its rows of
  (K Kᵀ + λ I)⁻¹ V); over the requests they sum to the applied ΔW, in a
  live model one request of a batch can be subtracted, and the saved
  manifest (factors, not dense leaves) verifies."""
  from keditjax.stream import live as live_lib
  from keditjax.stream import verify as verify_lib
  layers = (2, 3)
  editor = editors.get("ultraedit", layers=layers, lr=0.5)
  state = editor.init(model)
  new_params, _, info = editor.apply(model, model.params, REQUESTS[:2],
                                     state)
  rows = mend.request_rows(model, base.make_requests(REQUESTS[:2]))
  tokens = ultraedit.token_weights(rows, "all").sum(-1)
  for layer in layers:
    path = mend.kernel_path(model.config, layer)
    got = np.asarray(base.get_leaf(new_params, path) -
                     base.get_leaf(model.params, path))
    shares = [t.factors for r in info.records for t in r.touched
              if t.path == path]
    assert [u.shape[1] for u, _ in shares] == tokens[:2].astype(int).tolist()
    total = sum(u.astype(np.float64) @ v for u, v in shares)
    np.testing.assert_allclose(total, got, rtol=0, atol=1e-5 * abs(got).max())
  # The push-through identity against NumPy on random rows.
  rng = np.random.default_rng(0)
  k, v = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
  owner = np.array([0, 0, -1, 1, 1, 1, 2])
  pairs = ultraedit.factored(k, v, owner, 0.5, 3)
  kv = k[owner >= 0]
  want = np.linalg.solve(kv.T @ kv + 0.5 * np.eye(5), kv.T @ v[owner >= 0])
  np.testing.assert_allclose(sum(a @ b for a, b in pairs), want, atol=1e-5)
  live = live_lib.LiveModel(model, editor, max_batch=2)
  applied = live.edit(REQUESTS[:2])
  live.edit(REQUESTS[2:3])
  before = live.params
  live.rollback(applied[0].id, mode="subtract")
  for layer in layers:
    path = mend.kernel_path(model.config, layer)
    u, v = [t.factors for t in applied[0].record.touched if t.path == path][0]
    np.testing.assert_allclose(np.asarray(base.get_leaf(live.params, path)),
                               np.asarray(base.get_leaf(before, path)) - u @ v,
                               atol=1e-5)
  assert applied[0].id not in live.edits and applied[1].id in live.edits
  out = live.save(str(tmp_path / "edited"))
  report = verify_lib.verify(model.params, out)
  assert report.ok, report.summary()
  declared = [d for op in live.manifest.operations for d in op.deltas]
  assert declared and {d.form for d in declared} == {"factored"}


def test_a_call_whose_factors_outgrow_the_dense_change_records_none(model):
  """n (F + D) >= F D (here 128 · 64 / 192 ≈ 43 tokens): no factors."""
  editor = editors.get("ultraedit", layers=(2, 3), lr=0.5)
  _, _, info = editor.apply(model, model.params, REQUESTS[:2],
                            editor.init(model))
  assert all(t.factors is not None for r in info.records for t in r.touched)
  _, _, info = editor.apply(model, model.params, REQUESTS, editor.init(model))
  assert all(t.factors is None for r in info.records for t in r.touched)
  assert len(info.records) == 6 and len(info.records[0].touched) == 2
