"""Editor contract v2: states are pytrees, keywords are checked, every apply
returns exact edit records, and states save/restore across processes."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import alphaedit_resume_worker as worker
from keditjax import editors, errors
from keditjax.editors import base, mend, state_io
from keditjax.models import tiny
from keditjax.models.lm import LanguageModel
from keditjax.models.tokenizer import Tokenizer
from tests.test_editor_pins import REQUESTS, spd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = ("{}", "A short prefix. {}")
LOOSE = dict(clamp_norm_factor=1e4, v_weight_decay=0.0,
             v_compute_dtype="float32", v_steps=5)
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Paris is the capital of France and a large city in Europe."] * 4
DOWN1 = "layers_1/mlp/down_proj"


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm()


def _alpha_cov():
  return worker.setup()[2]


def build(name, model, **overrides):
  """`(editor, state)` of `name` on the tiny model (no trained networks);
  `overrides` replace hyper-parameters (tests/test_fuzz.py)."""
  def get(method, **hp):
    return editors.get(method, **dict(hp, **overrides))
  covs = {1: spd(128, 11), 2: spd(128, 12)}
  if name == "rome":
    ed = get("rome", layer=1, **LOOSE)
    return ed, ed.init(model, covariance=spd(128, 5), templates=TEMPLATES)
  if name == "memit":
    ed = get("memit", layers=(1, 2), **LOOSE)
    return ed, ed.init(model, covariance=covs, templates=TEMPLATES)
  if name == "alphaedit":
    ed = get("alphaedit", layers=(1, 2), l2=1e-2, **LOOSE)
    return ed, ed.init(model, covariance=_alpha_cov(), templates=TEMPLATES)
  if name in ("ft", "ftl"):
    ed = get(name, params_regex=DOWN1, steps=3)
    return ed, ed.init(model)
  if name == "ftkl":
    ed = get("ftkl", params_regex=DOWN1, steps=3, kl_examples=2)
    return ed, ed.init(model, kl_inputs=TEXTS)
  if name == "ewc":
    ed = get("ewc", params_regex=DOWN1, steps=3, fisher_examples=4,
             fisher_batch=4, fisher_chunk=4, fisher_length=16, online=True)
    return ed, ed.init(model, fisher_data=TEXTS, progress=False,
                       use_cache=False)
  if name == "kn":
    ed = get("kn", layers=(1,), steps=2, max_neurons=2)
    return ed, ed.init(model)
  if name == "mend":
    width = model.config.hidden_size + model.config.intermediate_size
    net = mend.init_net(jax.random.key(0), num_layers=2,
                        in_dim=model.config.intermediate_size,
                        out_dim=model.config.hidden_size, rank=4,
                        init_lr=1e-3)
    norm = {"mean": np.zeros((2, width), np.float32),
            "std": np.ones((2, width), np.float32)}
    ed = get("mend", layers=(2, 3), rank=4)
    return ed, ed.init(model, trained=(net, norm))
  if name == "ultraedit":
    ed = get("ultraedit", layers=(2, 3))
    return ed, ed.init(model)
  if name == "tpatcher":
    ed = get("tpatcher", layer=3, memory_size=64, memory_task="", steps=5,
             capacity=2)
    return ed, ed.init(model)
  if name == "serac":
    ed = get("serac")
    return ed, ed.init(model)
  if name == "grace":
    ed = get("grace", layer=2, eps_factor=0.05, steps=5, lr=0.5)
    return ed, ed.init(model)
  if name == "wise":
    ed = get("wise", layer=2, num_contexts=1, num_negatives=4,
             negative_length=17, steps=5, save_freq=500, hard_negatives=0,
             locality_prompts=0)
    return ed, ed.init(model)
  raise ValueError(name)


BUILDABLE = ("rome", "memit", "alphaedit", "ft", "ftl", "ftkl", "ewc", "kn",
             "mend", "ultraedit", "tpatcher", "serac")


def _walk(node, where):
  """Asserts `node` holds no model, tokenizer or callable anywhere."""
  assert not isinstance(node, (LanguageModel, Tokenizer)), where
  assert not callable(node) or isinstance(node, (np.ndarray, jax.Array)), (
      where, node)
  if dataclasses.is_dataclass(node):
    for f in dataclasses.fields(node):
      _walk(getattr(node, f.name), f"{where}.{f.name}")
  elif isinstance(node, dict):
    for k, v in node.items():
      _walk(v, f"{where}[{k!r}]")
  elif isinstance(node, (tuple, list)):
    for i, v in enumerate(node):
      _walk(v, f"{where}[{i}]")


@pytest.mark.parametrize("name", BUILDABLE)
def test_state_is_a_pytree_of_arrays(model, name, tmp_path):
  editor, state = build(name, model)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves), [
      type(x) for x in leaves]
  _walk(state, name)
  again = jax.tree.unflatten(treedef, leaves)
  assert type(again) is type(state)
  assert jax.tree.structure(again) == treedef
  # An apply keeps it one (same structure: it can be carried by a jitted
  # loop or saved again).
  _, new_state, info = editor.apply(model, model.params, REQUESTS[:1], state)
  assert jax.tree.structure(new_state) == treedef
  assert all(isinstance(x, (np.ndarray, jax.Array))
             for x in jax.tree.leaves(new_state))
  assert len(info.records) == 1
  json.dumps(info.to_json())
  # It saves and restores (orbax), static metadata and dtypes included.
  state_io.save_state(str(tmp_path), editor, model, new_state)
  back = state_io.load_state(str(tmp_path), editor, model)
  assert jax.tree.structure(back) == treedef
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(new_state)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(editors.METHODS))
def test_unknown_keywords_are_config_errors(model, name):
  editor = editors.get(name)
  with pytest.raises(errors.ConfigError, match="nonsense"):
    editor.init(model, nonsense=1)
  with pytest.raises(errors.ConfigError, match="nonsense"):
    editor.apply(model, model.params, REQUESTS[:1], None, nonsense=1)


def test_registry_is_lazy_and_complete():
  for name, spec in editors.METHODS.items():
    assert spec.name == name and spec.family in editors.FAMILIES
    assert isinstance(spec.init_needs, tuple)
  assert editors.METHODS["ewc"].init_needs == ("fisher_data",)
  assert editors.METHODS["rome"].batches is False


def _delta(old, new, path):
  return (np.asarray(base.get_leaf(new, path), np.float64) -
          np.asarray(base.get_leaf(old, path), np.float64))


def _check_factors(records, old, new, n):
  assert len(records) == n and len({r.id for r in records}) == n
  total = {}
  for record in records:
    for leaf in record.touched:
      u, v = leaf.factors
      assert u.dtype == np.float32 and u.shape[1] == v.shape[0]
      total[leaf.path] = total.get(leaf.path, 0) + u.astype(
          np.float64) @ v.astype(np.float64)
  assert total
  for path, summed in total.items():
    delta = _delta(old, new, path)
    assert np.linalg.norm(summed - delta) <= 1e-4 * np.linalg.norm(delta), path


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_records_factors_reproduce_the_update(model, name):
  editor, state = build(name, model)
  p1, state, info = editor.apply(model, model.params, REQUESTS[:2], state)
  assert [r.request for r in info.records] == list(
      base.make_requests(REQUESTS[:2]))
  assert all(r.method == name for r in info.records)
  _check_factors(info.records, model.params, p1, 2)
  p2, _, info = editor.apply(model, p1, REQUESTS[2:], state)
  _check_factors(info.records, p1, p2, 1)
  small = info.to_json()["records"][0]["touched"][0]
  assert set(small) == {"type", "path", "factor_shapes", "sha256"}


def test_records_without_factors(model):
  editor, state = build("ftl", model)
  _, _, info = editor.apply(model, model.params, REQUESTS, state)
  assert len(info.records) == 3
  assert all(r.touched == (base.LeafDelta(
      ("layers_1", "mlp", "down_proj", "kernel")),) for r in info.records)


def test_replace_leaves_allow_new():
  params = {"a": {"b": np.zeros(2)}, "c": np.ones(1)}
  new = base.replace_leaves(params, {("a", "b"): np.ones(2)})
  assert new["c"] is params["c"] and params["a"]["b"].sum() == 0
  with pytest.raises(errors.SiteError, match="does not exist"):
    base.replace_leaves(params, {("adapters", "x", "keys"): np.ones(3)})
  new = base.replace_leaves(params, {("adapters", "x", "keys"): np.ones(3),
                                     ("a", "z"): np.ones(1)}, allow_new=True)
  assert new["adapters"]["x"]["keys"].shape == (3,)
  assert set(new["a"]) == {"b", "z"} and new["a"]["b"] is params["a"]["b"]
  assert "adapters" not in params and set(params["a"]) == {"b"}
  with pytest.raises(errors.SiteError, match="leaf"):
    base.replace_leaves(params, {("c", "d"): np.ones(1)}, allow_new=True)


def test_save_load_round_trip_and_refusals(model, tmp_path):
  memit_ed, memit_state = build("memit", model)
  state_io.save_state(str(tmp_path / "m"), memit_ed, model, memit_state)
  meta = json.load(open(tmp_path / "m" / "editor_state.json"))
  assert meta["method"] == "memit" and meta["hparams"]["layers"] == [1, 2]
  back = state_io.load_state(str(tmp_path / "m"), memit_ed, model)
  assert jax.tree.structure(back) == jax.tree.structure(memit_state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(memit_state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  alpha = editors.get("alphaedit", layers=(1, 2), l2=1e-2, **LOOSE)
  with pytest.raises(errors.CheckpointError, match="memit"):
    state_io.load_state(str(tmp_path / "m"), alpha, model)
  wide = tiny.tiny_lm(hidden_size=96)
  with pytest.raises(errors.CheckpointError, match="another model"):
    state_io.load_state(str(tmp_path / "m"), memit_ed, wide)
  other = editors.get("memit", layers=(1, 2), **dict(LOOSE, v_steps=6))
  with pytest.raises(errors.CheckpointError, match="v_steps"):
    state_io.load_state(str(tmp_path / "m"), other, model)
  with pytest.raises(errors.CheckpointError, match="no readable"):
    state_io.load_state(str(tmp_path / "nothing"), memit_ed, model)


def test_alphaedit_resumes_in_a_new_process(tmp_path):
  model, editor, cov = worker.setup()
  state0 = editor.init(model, covariance=cov, templates=TEMPLATES)
  params, state = worker.run(model, editor, model.params, state0, 0,
                             worker.SPLIT)
  state_io.save_state(str(tmp_path / "state"), editor, model, state)
  np.savez(tmp_path / "params.npz", **worker.flat(params))
  # The uninterrupted run, here, while the worker resumes from disk.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests",
                                    "alphaedit_resume_worker.py"),
       str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  full, full_state = worker.run(model, editor, params, state, worker.SPLIT,
                                worker.N)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert int(full_state.num_edits) == worker.N
  resumed = dict(np.load(tmp_path / "final.npz"))
  want = worker.flat(full)
  assert set(resumed) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(resumed[key], value, rtol=0, atol=1e-6,
                               err_msg=key)
  changed = [k for k in want if not np.array_equal(
      want[k], np.asarray(base.get_leaf(model.params, k.split("/"))))]
  assert sorted(changed) == ["layers_1/mlp/down_proj/kernel",
                             "layers_2/mlp/down_proj/kernel"]


def test_edit_layout_pads_to_buckets_and_points_at_the_predicting_positions(
    model):
  out = base.edit_layout(model, [5, 6, 7], [8, 9])
  length = out["tokens"].shape[1]
  assert out["tokens"].shape == out["mask"].shape == (1, length) and length >= 5
  np.testing.assert_array_equal(out["tokens"][0, :5], [5, 6, 7, 8, 9])
  assert out["tokens"][0, 5:].sum() == 0
  np.testing.assert_array_equal(out["mask"][0], [1] * 5 + [0] * (length - 5))
  assert out["where"].shape[1] % 4 == 0
  np.testing.assert_array_equal(out["where"][0, :2], [2, 3])  # 7→8, 8→9
  np.testing.assert_array_equal(out["targets"][0, :2], [8, 9])
  np.testing.assert_array_equal(out["tmask"][0], [1, 1] + [0] * (
      out["tmask"].shape[1] - 2))


def test_adapter_editors_refuse_bad_layers_and_encoders(model):
  with pytest.raises(errors.ConfigError, match="layer"):
    base.check_decoder_layer(model, model.config.num_layers, "GRACE")
  encoder = types.SimpleNamespace(config=types.SimpleNamespace(
      num_layers=model.config.num_layers, is_decoder=False))
  with pytest.raises(errors.ConfigError, match="WISE edits decoder"):
    base.check_decoder_layer(encoder, 0, "WISE")
