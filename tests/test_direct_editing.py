"""ROME, MEMIT, AlphaEdit: closed-form kernels and the editors end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keditjax import editors, errors
from keditjax.editors import base, compute
from keditjax.kernels import linalg
from tests.conftest import make_tiny_lm

REQUEST = {"prompt": "The mother tongue of Danielle Darrieux is",
           "subject": "Danielle Darrieux", "target_new": "English",
           "ground_truth": "French"}
REQUESTS = [
    REQUEST,
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda",
     "target_new": "piano", "ground_truth": "guitar"},
    {"prompt": "The capital of Norway is", "subject": "Norway",
     "target_new": "Rome", "ground_truth": "Oslo"},
]
TEMPLATES = ("{}", "A short prefix. {}", "Another one here. {}")
# A random tiny model's MLP outputs are tiny, so ROME's clamp (a multiple of
# their norm) and weight decay (divided by it) are loosened here.
LOOSE = dict(clamp_norm_factor=1e4, v_weight_decay=0.0,
             v_compute_dtype="float32")


def _spd(f, seed, rank=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rank or 4 * f, f))
  return (x.T @ x / len(x)).astype(np.float32)


# -- kernels -----------------------------------------------------------------

def test_rank_one_update_maps_key_to_value_with_rank_one():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  k = rng.normal(size=32).astype(np.float32)
  v = rng.normal(size=16).astype(np.float32)
  cov = _spd(32, 1)
  delta = np.asarray(linalg.rank_one_update(w, k, v, np.linalg.solve(cov, k)))
  np.testing.assert_allclose(k @ (w + delta), v, atol=1e-4)
  assert np.linalg.matrix_rank(delta, tol=1e-5) == 1
  # Keys C-orthogonal to k* (uᵀCk* = 0 <=> u ⊥ C⁻¹k*) keep their values.
  u = rng.normal(size=32)
  ck = np.linalg.solve(cov, k)
  u -= (u @ ck) / (ck @ ck) * ck
  np.testing.assert_allclose(u @ delta, 0, atol=1e-4)


def test_memit_update_limits():
  rng = np.random.default_rng(2)
  keys = rng.normal(size=(5, 24)).astype(np.float32)
  res = rng.normal(size=(5, 8)).astype(np.float32)
  cov = _spd(24, 3)
  assert np.abs(np.asarray(linalg.memit_update(keys, res, cov, 1e9))).max() < 1e-6
  # One key: ROME's rank-one update with the same covariance, scaled by
  # s / (λ + s), s = kᵀC⁻¹k (Sherman-Morrison); λ -> 0 gives ROME exactly.
  w = rng.normal(size=(24, 8)).astype(np.float32)
  k = keys[0]
  cinv_k = np.linalg.solve(cov, k)
  s = k @ cinv_k
  rome = np.asarray(linalg.rank_one_update(w, k, k @ w + res[0], cinv_k))
  for lam in (0.5, 5.0):
    memit_one = np.asarray(linalg.memit_update(keys[:1], res[:1], cov, lam))
    assert np.linalg.matrix_rank(memit_one, tol=1e-5) == 1
    np.testing.assert_allclose(memit_one, rome * s / (lam + s), rtol=1e-3,
                               atol=1e-5)
  # With λ = 0 and independent keys every residual is written exactly.
  exact = np.asarray(linalg.memit_update(keys, res, cov, 1e-4))
  np.testing.assert_allclose(keys @ exact, res, atol=2e-3)


def test_alphaedit_update_preserves_projected_keys():
  rng = np.random.default_rng(4)
  f, d = 32, 8
  basis = np.linalg.qr(rng.normal(size=(f, f)))[0]
  # Preserved keys live in the first 20 directions; 12 are (near) null.
  eig = np.concatenate([rng.uniform(1, 2, 20), np.full(12, 1e-6)])
  cov = (basis * eig) @ basis.T
  preserved = rng.normal(size=(100, 20)) @ basis[:, :20].T
  proj, dim = linalg.null_space_projector(jnp.asarray(cov, jnp.float32), 1e-3)
  assert dim == 12
  keys = rng.normal(size=(3, f)).astype(np.float32)
  res = rng.normal(size=(3, d)).astype(np.float32)
  delta = np.asarray(linalg.alphaedit_update(
      keys, res, proj, jnp.zeros((f, f)), 1.0))
  assert np.linalg.norm(preserved @ delta) < 1e-3 * np.linalg.norm(delta)
  # The edit still moves the new keys toward their residuals.
  assert np.linalg.norm(keys @ delta) > 0.1 * np.linalg.norm(res)


def test_null_space_energy_is_the_preserved_energy_inside_the_null_space():
  rng = np.random.default_rng(5)
  f = 16
  basis = np.linalg.qr(rng.normal(size=(f, f)))[0]
  eig = np.linspace(0.1, 10.0, f)
  cov = (basis * eig) @ basis.T
  # Below 2.0: eigenvalues 0.1, 0.76, 1.42 (linspace step 0.66).
  want = eig[eig < 2.0].sum() / eig.sum()
  got = linalg.null_space_energy(jnp.asarray(cov, jnp.float32), 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Against the projector: tr(P C) / tr(C), and E‖Pk‖² over sampled keys.
  proj, _ = linalg.null_space_projector(jnp.asarray(cov, jnp.float32), 2.0)
  np.testing.assert_allclose(np.trace(np.asarray(proj) @ cov) / np.trace(cov),
                             want, rtol=1e-4)
  keys = rng.normal(size=(20000, f)) * np.sqrt(eig) @ basis.T
  share = (np.square(keys @ np.asarray(proj)).sum() /
           np.square(keys).sum())
  np.testing.assert_allclose(share, want, rtol=0.05)
  assert linalg.null_space_energy(jnp.asarray(cov, jnp.float32), 0.05) == 0.0


# -- requests ----------------------------------------------------------------

def test_requests_layouts_and_errors():
  r = base.make_request(REQUEST)
  assert r.prompt == "The mother tongue of {} is" and r.target_new == " English"
  assert r.target_true == " French"
  rome_layout = {"case_id": 7, "requested_rewrite": {
      "prompt": "{} plays the", "subject": "Toko Yasuda",
      "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}}
  r2 = base.make_request(rome_layout)
  assert (r2.text, r2.target_new, r2.case_id) == ("Toko Yasuda plays the",
                                                  " piano", 7)
  with pytest.raises(errors.InputError, match="does not occur"):
    base.make_request(dict(REQUEST, subject="Edith Piaf"))
  with pytest.raises(errors.InputError, match="empty target_new"):
    base.make_request(dict(REQUEST, target_new="  "))
  with pytest.raises(errors.InputError, match="empty subject"):
    base.make_request(dict(REQUEST, subject=""))
  with pytest.raises(errors.InputError, match="no edit requests"):
    base.make_requests([])


def test_layout_splits_at_subject_last_token():
  model = make_tiny_lm()
  r = base.make_request(REQUEST)
  ids, last = compute.tokenize_around_subject(model.tokenizer,
                                              compute.fill("Hi. {}", r),
                                              r.subject)
  assert model.tokenizer.decode(ids[:last + 1]).endswith("Darrieux")
  rows = compute.value_rows(model, [r], ("{}", "Hi. {}"))[0]
  layout = compute.make_layout(rows)
  target = model.encode(" English")
  for i in range(2):
    tail = [t for t, m in zip(layout.suffix_tokens[i], layout.suffix_mask[i])
            if m]
    assert tail[-(len(target) - 1):] == target[:-1]
    pos = layout.target_pos[i][:len(target)]
    # Logits at target_pos[j] predict target[j], the next token fed in.
    assert [tail[p + 1] for p in pos[:-1]] == target[:-1]


# -- editors end to end --------------------------------------------------------

@pytest.fixture(scope="module")
def model():
  return make_tiny_lm(num_layers=4, seed=1)


def _p_new(model, params, request):
  r = base.make_request(request)
  return float(model.score(params, [r.text], [r.target_new],
                           reduction="mean")[0])


def _rank(x):
  """Numerical rank, ignoring float32 round-off of `w + Δw - w`."""
  sv = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  return int(np.sum(sv > 1e-3 * sv[0]))


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_rome_writes_k_star_to_v_star(model):
  cov = _spd(128, 5)
  editor = editors.get("rome", layer=1, v_steps=30, **LOOSE)
  state = editor.init(model, covariance=cov, templates=TEMPLATES)
  before = _copy(model.params)
  new_params, _, info = editor.apply(model, model.params, REQUEST, state)
  jax.tree.map(np.testing.assert_array_equal, model.params, before)
  path = model.site_param("layer/1/mlp/value")
  change = base.describe_changes(model.params, {path: base.get_leaf(
      new_params, path)}, with_rank=True)["/".join(path)]
  assert change["rank"] == 1
  assert change["delta_norm"] == pytest.approx(
      info.changed["/".join(path)]["delta_norm"])
  assert set(info.seconds) == {"key", "value", "update"}
  # k* (mean key over the templates) now maps to k*W + δ = v*.
  r = base.make_request(REQUEST)
  key = compute.subject_keys(model, model.params, [r], TEMPLATES,
                             ["layer/1/mlp/key"])["layer/1/mlp/key"][0]
  values = compute.optimize_values(model, model.params, [r], TEMPLATES,
                                   layer=1, site_kind="mlp/value",
                                   hp=editor.hparams.value_hparams())
  w_old = np.asarray(base.get_leaf(model.params, path))
  w_new = np.asarray(base.get_leaf(new_params, path))
  np.testing.assert_allclose(key @ w_new, key @ w_old + values["delta"][0],
                             rtol=1e-4, atol=1e-4)


def test_rome_identity_covariance_and_composition(model):
  editor = editors.get("rome", layer=2, use_covariance=False, **LOOSE)
  state = editor.init(model, templates=TEMPLATES)
  p1, _, _ = editor.apply(model, model.params, REQUESTS[0], state)
  p2, _, info = editor.apply(model, p1, REQUESTS[1], state)  # editors compose
  assert jax.tree.structure(p2) == jax.tree.structure(model.params)
  path = model.site_param("layer/2/mlp/value")
  w0, w1, w2 = (np.asarray(base.get_leaf(p, path))
                for p in (model.params, p1, p2))
  assert _rank(w2 - w0) == 2 and _rank(w2 - w1) == 1
  assert info.changed["/".join(path)]["delta_norm"] > 0


def test_value_loop_compiles_once_per_bucket(model):
  editor = editors.get("rome", layer=1, use_covariance=False, v_steps=3)
  state = editor.init(model, templates=TEMPLATES)
  editor.apply(model, model.params, REQUESTS[0], state)
  n = compute._optimize._cache_size()
  same_shape = dict(REQUESTS[0], target_new="Spanish")  # same bucket
  editor.apply(model, model.params, same_shape, state)
  assert compute._optimize._cache_size() == n


def test_memit_batch(model):
  covs = {l: _spd(128, 10 + l) for l in (1, 2)}
  editor = editors.get("memit", layers=(1, 2), mom2_update_weight=1.0,
                       v_chunk=2, **LOOSE)
  state = editor.init(model, covariance=covs, templates=TEMPLATES)
  before = _copy(model.params)
  new_params, _, info = editor.apply(model, model.params, REQUESTS, state)
  jax.tree.map(np.testing.assert_array_equal, model.params, before)
  assert len(info.changed) == 2 and len(info.extras["steps"]) == 3
  # With one template and a tiny λ every layer writes its share exactly, so
  # the residual after the last layer reaches the optimised z = h_L + δ.
  exact = editors.get("memit", layers=(1, 2), mom2_update_weight=1e-5,
                      **LOOSE)
  rs = base.make_requests(REQUESTS)
  values = compute.optimize_values(model, model.params, rs, ("{}",), layer=2,
                                   site_kind="resid",
                                   hp=exact.hparams.value_hparams())
  edited, _, _ = exact.apply(model, model.params, rs,
                             dict_state(state, ("{}",)))
  rows = [compute.tokenize_around_subject(model.tokenizer, r.prompt,
                                          r.subject) for r in rs]
  z = compute.capture_at_subject(model, edited, rows, ["layer/2/resid"])
  np.testing.assert_allclose(z["layer/2/resid"],
                             values["v0"] + values["delta"], rtol=2e-3,
                             atol=2e-3)
  # A huge λ leaves the weights (almost) unchanged.
  frozen = editors.get("memit", layers=(1, 2), mom2_update_weight=1e12,
                       v_steps=2)
  same, _, _ = frozen.apply(model, model.params, REQUESTS[:1], state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               same, model.params)


def dict_state(state, templates):
  import dataclasses
  return dataclasses.replace(state, templates=templates)


def test_memit_default_lambda_scales_with_width():
  hp = editors.hparams_class("memit")()
  assert hp.lam(1536) == 768 and hp.lam(16384) == 8192  # 0.5 per MLP unit
  assert editors.hparams_class("memit")(mom2_update_weight=2000.).lam(5) == 2000


def test_alphaedit_preserves_keys_and_accumulates(model):
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(128, 128)))[0]
  eig = np.concatenate([rng.uniform(1, 2, 96), np.full(32, 1e-7)])
  cov = ((basis * eig) @ basis.T).astype(np.float32)
  editor = editors.get("alphaedit", layers=(1, 2), l2=1e-2, **LOOSE)
  state = editor.init(model, covariance={1: cov, 2: cov}, templates=TEMPLATES)
  assert dict(zip(state.layers, state.nullspace_dims)) == {1: 32, 2: 32}
  # The null space holds 32 × 1e-7 of a trace of ~96 × 1.5: ~0 percent.
  assert all(0 <= e < 1e-4 for e in state.nullspace_energy)
  p1, state1, info = editor.apply(model, model.params, REQUESTS[:2], state)
  assert info.extras["nullspace_energy_percent"] == dict(
      zip(state.layers, state.nullspace_energy))
  preserved = rng.normal(size=(50, 96)) @ basis[:, :96].T
  for layer in (1, 2):
    path = model.site_param(f"layer/{layer}/mlp/value")
    delta = np.asarray(base.get_leaf(p1, path)) - np.asarray(
        base.get_leaf(model.params, path))
    assert np.linalg.norm(preserved @ delta) < 1e-3 * np.linalg.norm(delta)
  assert state1.num_edits == 2 and state.num_edits == 0
  assert float(jnp.abs(state1.edited_keys["1"]).sum()) > 0
  assert float(jnp.abs(state.edited_keys["1"]).sum()) == 0  # input untouched


def test_bad_requests_fail_before_work(model, monkeypatch):
  editor = editors.get("rome", layer=1, use_covariance=False)
  state = editor.init(model, templates=TEMPLATES)
  calls = []
  monkeypatch.setattr(compute, "subject_keys",
                      lambda *a, **k: calls.append(1))
  with pytest.raises(errors.InputError, match="does not occur"):
    editor.apply(model, model.params,
                 [REQUEST, dict(REQUEST, subject="Piaf")], state)
  with pytest.raises(errors.InputError, match="empty target_new"):
    editor.apply(model, model.params, dict(REQUEST, target_new=""), state)
  real_encode = model.tokenizer.encode
  monkeypatch.setattr(model.tokenizer, "encode",
                      lambda t: [] if t == " ???" else real_encode(t))
  with pytest.raises(errors.InputError, match="tokenizes to nothing"):
    editor.apply(model, model.params, dict(REQUEST, target_new="???"), state)
  assert not calls
  with pytest.raises(errors.ConfigError, match="out of range"):
    editors.get("rome", layer=9).init(model, templates=TEMPLATES,
                                      covariance=_spd(128, 0))
  with pytest.raises(errors.InputError, match="NaN"):
    editors.get("rome", layer=1).init(
        model, templates=TEMPLATES, covariance=np.full((128, 128), np.nan))
  with pytest.raises(errors.InputError, match="singular|semi-definite"):
    editors.get("rome", layer=1).init(
        model, templates=TEMPLATES, covariance=_spd(128, 0, rank=10))
  with pytest.raises(errors.UnsupportedConfigError, match="no hyper"):
    editors.get("rome", learning_rate=1.0)
  with pytest.raises(errors.ConfigError, match="Unknown editing method"):
    editors.get("bogus")


def test_row_stream_equals_recomputing_from_the_embeddings(model):
  """MEMIT's incremental passes see lower-layer edits like a full rerun."""
  rows = [compute.tokenize_around_subject(model.tokenizer, compute.fill(t, r),
                                          r.subject)
          for r in base.make_requests(REQUESTS) for t in TEMPLATES]
  stream = compute.RowStream(model, rows, batch_size=4)  # several batches
  stream.advance(model.params, 1)
  path = model.site_param("layer/1/mlp/value")
  w = base.get_leaf(model.params, path)
  edited = base.replace_leaves(model.params, {path: w * 3.0})
  stream.advance(edited, 2)
  names = ["layer/2/mlp/key", "layer/3/resid"]
  got = stream.peek(edited, 4, names)
  want = compute.capture_at_subject(model, edited, rows, names)
  for name in names:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
  # The lower-layer edit changed what the stream sees above it.
  assert not np.allclose(got["layer/3/resid"], compute.capture_at_subject(
      model, model.params, rows, ["layer/3/resid"])["layer/3/resid"])


def test_memit_keys_average_per_context_type_like_the_reference(model):
  """MEMIT's reference averages a request's keys within each context type
  and then across types (the bare prompt weighs ½ with one generated group),
  not over all templates at once (1/6). Fails on the flat mean."""
  from keditjax.editors import memit  # pylint: disable=import-outside-toplevel
  templates = ("{}", "A short prefix. {}", "Another one here. {}",
               "And a third. {}")
  hp = editors.hparams_class("memit")(layers=(1, 2), v_steps=2,
                                      context_lengths=((10, 3),), **LOOSE)
  np.testing.assert_allclose(
      memit.template_weights(4, hp.context_lengths), [1 / 2] + [1 / 6] * 3)
  np.testing.assert_allclose(
      memit.template_weights(4, ((5, 1), (10, 2)), "per_type"),
      [1 / 3, 1 / 3, 1 / 6, 1 / 6])
  np.testing.assert_allclose(memit.template_weights(4, (), "flat"), [0.25] * 4)
  state = memit.init_state(model, model.params, hp, {1: _spd(128, 1),
                                                     2: _spd(128, 2)},
                           templates)
  rs = base.make_requests(REQUESTS[:2])
  zero = lambda layer, keys, residuals, w: jnp.zeros_like(w)
  factor = lambda layer, keys: jnp.zeros((keys.shape[1], keys.shape[0]))
  _, _, keys = memit.spread_update(model, model.params, rs, state, hp, zero,
                                   factor, "memit")
  per = np.stack([compute.capture_at_subject(
      model, model.params,
      [compute.tokenize_around_subject(model.tokenizer, compute.fill(t, r),
                                       r.subject) for t in templates],
      ["layer/1/mlp/key"])["layer/1/mlp/key"] for r in rs])  # [N, T, F]
  want = 0.5 * per[:, 0] + 0.5 * per[:, 1:].mean(1)
  np.testing.assert_allclose(np.asarray(keys[1]), want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(want, per.mean(1), atol=1e-4)  # the old flat mean
  with pytest.raises(errors.ConfigError, match="key_weighting"):
    editors.get("memit", key_weighting="mean")


def test_rome_edits_the_last_layer_scanned_or_not(model):
  """No blocks above the edit layer: the scanned default runs (no empty
  stack) and equals the unrolled loop."""
  last = model.config.num_layers - 1
  got = []
  for scan in (True, False):
    editor = editors.get("rome", layer=last, use_covariance=False, v_steps=5,
                         v_scan_layers=scan, **LOOSE)
    state = editor.init(model, templates=TEMPLATES)
    new_params, _, info = editor.apply(model, model.params, REQUEST, state)
    got.append(np.asarray(base.get_leaf(
        new_params, model.site_param(f"layer/{last}/mlp/value"))))
    assert info.extras["delta_norm"][0] > 0
  np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-6)
