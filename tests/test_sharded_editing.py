"""Editing a sharded model: ROME, MEMIT, AlphaEdit, FT-L and GRACE on 8
simulated devices give the single-device params, and the leaves stay sharded.

As in test_sharding.py, the device count is fixed when jax initialises, so
the checks run in subprocesses that write their edited params (NumPy) and a
JSON report: one on a single device (the reference) and one per mesh on 8
simulated devices, all at once (each compiles on about one core). Each edits
a random tiny model (3 layers) with few optimisation steps and explicit
covariances, with XLA's CPU backend optimisations off (the same flags
everywhere: compiling is most of the time).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keditjax import errors, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true")

# `python -c WORKER ROLE OUT`: ROLE "single" (one device), "2x4" or "8x1"
# (8 devices) writes OUT/ROLE.npz (the original params "old|a:b:c" and each
# method's new ones "rome|a:b:c", ...) and OUT/ROLE.json (placements, and
# the evaluate launcher on one device, the edit launcher on 8).
WORKER = r"""
import json, os, sys, tempfile
import numpy as np, jax
from keditjax import editors, errors, sharding, stats
from keditjax.editors import base as base_lib
from keditjax.models import tiny

role, out_dir = sys.argv[1:3]
assert jax.device_count() == (1 if role == "single" else 8), jax.devices()
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is",
     "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda",
     "target_new": "piano"},
]
TEMPLATES = ("{}", "A short prefix. {}")
# A random tiny model's MLP outputs are small: loosen ROME's clamp and decay
# (as tests/test_direct_editing.py does), and keep v* steps small enough that
# the rank-one edits stay O(1) (a float32 rounding then stays below 1e-5).
V = dict(clamp_norm_factor=1e4, v_weight_decay=0.0, v_compute_dtype="float32",
         v_steps=4, v_lr=0.05)

def spd(f, seed):
  x = np.random.default_rng(seed).normal(size=(4 * f, f))
  return (x.T @ x / len(x)).astype(np.float32)

rng = np.random.default_rng(0)
basis = np.linalg.qr(rng.normal(size=(128, 128)))[0]
eig = np.concatenate([rng.uniform(1, 2, 96), np.full(32, 1e-7)])
acov = ((basis * eig) @ basis.T).astype(np.float32)
CASES = {  # method -> (hparams, init inputs, requests)
    "rome": (dict(layer=1, **V),
             dict(covariance=spd(128, 5), templates=TEMPLATES), REQUESTS[:1]),
    "memit": (dict(layers=(0, 1), mom2_update_weight=0.1, **V), dict(
        covariance={0: spd(128, 11), 1: spd(128, 12)}, templates=TEMPLATES),
              REQUESTS),
    "alphaedit": (dict(layers=(0, 1), l2=1e-2, **V),
                  dict(covariance={0: acov, 1: acov}, templates=TEMPLATES),
                  REQUESTS),
    # SGD: Adam's first steps move every coordinate by about ±lr whatever
    # its gradient's size, so a near-zero gradient whose sign a rounding
    # flips would move by 2 lr (the optimiser's sharded path is the same).
    "ftl": (dict(params_regex="layers_1/mlp/down_proj", steps=4, lr=1.0,
                 optimizer="sgd", radius=0.05), {}, REQUESTS),
    "grace": (dict(layer=1, steps=4), {}, REQUESTS[:1]),
}

def flat(params):
  return {":".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): x
          for p, x in jax.tree_util.tree_leaves_with_path(params)}

# A launcher's `main` with `model` for whatever it loads: `--mesh=4x4` must
# fail before loading (the model name does not exist), and a mesh that fits
# ("2x4" on 8 devices, "1x1" on one) must shard the loaded model on it (a spy
# stops `main` there). One launcher per process: their absl flags clash.
def run_launcher(name, model):
  import importlib
  from keditjax import models
  flags = ["--compilation_cache=off"]
  if name == "evaluate":
    flags += ["--output_dir=/nonexistent/out", "--num_edits=1",
              "--heldout=none", "--nofluency"]
  sys.argv = [name, "--model=hf:/nonexistent/model", "--mesh=4x4"] + flags
  launcher = importlib.import_module("experiments." + name)
  launcher.FLAGS(sys.argv)
  out = {}
  try:
    launcher.main([])
  except errors.ShardingError as e:
    out["bad_mesh"] = str(e)
  class Placed(Exception):
    pass
  def spy(loaded, mesh, *args, **kwargs):
    raise Placed(dict(mesh.shape), loaded is model)
  models.load, sharding.shard_model = (lambda name: model), spy
  mesh = "2x4" if jax.device_count() == 8 else "1x1"
  launcher.FLAGS([name, "--mesh=" + mesh] + flags)
  try:
    launcher.main([])
  except Placed as e:
    out["placed"] = list(e.args)
  return out

def placement(x):
  if not isinstance(x, jax.Array):
    return {"spec": None, "devices": 0}
  spec = getattr(x.sharding, "spec", None)
  return {"spec": None if spec is None else list(spec),
          "devices": len(x.sharding.device_set)}

base = tiny.tiny_lm(num_layers=3)
model = base
if role != "single":
  model = sharding.shard_model(base, sharding.make_mesh(
      *sharding.parse_mesh(role)))
layout = flat(model.params)
arrays = {f"old|{k}": np.asarray(x) for k, x in flat(base.params).items()}
report = {"changed": {}, "layout_kept": {}}
for name, (hparams, inputs, requests) in CASES.items():
  editor = editors.get(name, **hparams)
  new = editor.apply(model, model.params, requests,
                     editor.init(model, **inputs))[0]
  leaves = flat(new)
  arrays.update({f"{name}|{k}": np.asarray(x) for k, x in leaves.items()})
  report["changed"][name] = {k: placement(x) for k, x in leaves.items()
                             if k not in layout or x is not layout[k]}
  report["layout_kept"][name] = all(leaves[k].sharding.is_equivalent_to(
      layout[k].sharding, layout[k].ndim) for k in layout)
  if name == "grace":  # the codebook acts in the (sharded) forward pass
    tokens = np.asarray([model.encode(requests[0]["prompt"])] * 2, np.int32)
    arrays["grace_logits"] = np.asarray(model.apply(new, tokens))

# A leaf written from the host takes the old leaf's place on the mesh.
path = ("layers_2", "mlp", "down_proj", "kernel")
host = base_lib.get_leaf(base.params, path) * np.float32(2)
written = base_lib.replace_leaves(model.params, {path: np.asarray(host)})
report["host_leaf"] = placement(base_lib.get_leaf(written, path))

# The key covariance of a tiny corpus, through ROME's init: on one device
# for the reference, on the model's own mesh for a sharded model.
corpus = os.path.join(tempfile.mkdtemp(), "corpus.txt")
with open(corpus, "w") as f:
  f.write("\n".join(f"Line {i}: the quick brown fox jumps over {i} dogs."
                    for i in range(64)))
os.environ["KEDITJAX_CACHE"] = tempfile.mkdtemp()  # a fresh stats cache
meshes, moments = [], stats.moments
def spy(model, layers, **kwargs):
  mesh = kwargs.get("mesh", "auto")
  meshes.append(dict(mesh.shape) if hasattr(mesh, "shape") else mesh)
  return moments(model, layers, **kwargs)
stats.moments = spy
rome = editors.get("rome", layer=1, mom2_corpus=corpus, mom2_tokens=512)
arrays["covariance"] = rome.init(model, templates=TEMPLATES).covariance
report["stats_meshes"] = meshes
if role in ("single", "8x1"):
  report["launcher"] = run_launcher(
      "evaluate" if role == "single" else "edit", base)
np.savez(os.path.join(out_dir, role + ".npz"), **arrays)
with open(os.path.join(out_dir, role + ".json"), "w") as f:
  json.dump(report, f)
"""

ROLES = {"single": 1, "2x4": 8, "8x1": 8}  # role -> devices


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """{role: (arrays, report)} of every worker, all started at once."""
  out = str(tmp_path_factory.mktemp("sharded_editing"))
  procs = {}
  for role, devices in ROLES.items():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
        f"--xla_force_host_platform_device_count={devices} "
        f"{XLA_FAST_COMPILE}")}
    # Output to files: a full pipe would block a worker nobody reads yet.
    with open(os.path.join(out, role + ".log"), "w") as log:
      procs[role] = subprocess.Popen(
          [sys.executable, "-c", WORKER, role, out], cwd=REPO, env=env,
          stdout=log, stderr=subprocess.STDOUT)
  failed = {}
  for role, proc in procs.items():
    if proc.wait(timeout=900):
      with open(os.path.join(out, role + ".log")) as log:
        failed[role] = log.read()[-3000:]
  assert not failed, failed
  got = {}
  for role in ROLES:
    with np.load(os.path.join(out, role + ".npz")) as npz:
      arrays = {k: npz[k] for k in npz.files}
    with open(os.path.join(out, role + ".json")) as f:
      got[role] = (arrays, json.load(f))
  return got


def leaves(arrays, method):
  """{"a:b:c": leaf} of `method`'s new params ("old": the original ones)."""
  prefix = method + "|"
  return {k[len(prefix):]: v for k, v in arrays.items()
          if k.startswith(prefix)}


def compare(results, method, mesh):
  """Max |sharded - single| over `method`'s new params, and the largest
  change the single-device edit made (float leaves)."""
  want = leaves(results["single"][0], method)
  got = leaves(results[mesh][0], method)
  old = leaves(results["single"][0], "old")
  assert sorted(got) == sorted(want)
  max_abs = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
  size = max(float(np.max(np.abs(want[k] - old.get(k, 0)))) for k in want
             if np.issubdtype(want[k].dtype, np.floating))
  return max_abs, size


METHODS = ("rome", "memit", "alphaedit", "ftl", "grace")
MESHES = ("2x4", "8x1")
# The MLP output projections each method writes (tiny model, CASES above).
WRITES = {"rome": ["layers_1:mlp:down_proj:kernel"],
          "memit": ["layers_0:mlp:down_proj:kernel",
                    "layers_1:mlp:down_proj:kernel"],
          "alphaedit": ["layers_0:mlp:down_proj:kernel",
                        "layers_1:mlp:down_proj:kernel"],
          "ftl": ["layers_1:mlp:down_proj:kernel"]}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_sharded_edit_equals_single_device(results, method, mesh):
  max_abs, size = compare(results, method, mesh)
  assert size > 1e-2, size  # the edit moved the params
  assert max_abs <= 1e-5, (max_abs, size)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", sorted(WRITES))
def test_edited_weights_stay_sharded(results, method, mesh):
  report = results[mesh][1]
  changed = report["changed"][method]
  assert sorted(changed) == WRITES[method]
  # down_proj [128, 64] is row-parallel: split over "model" (4 ways on 2x4),
  # and on all 8 devices (replicated over "data") on both meshes.
  for placement in changed.values():
    assert placement == {"spec": ["model", None], "devices": 8}
  assert report["layout_kept"][method]  # every leaf where the rules put it


@pytest.mark.parametrize("mesh", MESHES)
def test_grace_codebook_is_replicated_and_used(results, mesh):
  arrays, report = results[mesh]
  changed = report["changed"]["grace"]
  assert {k.rsplit(":", 1)[1] for k in changed} == {
      "keys", "values", "eps", "labels", "active"}
  assert all(k.startswith("adapters:layer/1/mlp/value:") for k in changed)
  for placement in changed.values():
    assert placement == {"spec": [], "devices": 8}
  assert report["layout_kept"]["grace"]  # weights untouched, still sharded
  want = results["single"][0]["grace_logits"]
  assert np.max(np.abs(arrays["grace_logits"] - want)) <= 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_covariance_runs_on_the_models_mesh(results, mesh):
  data, model = map(int, mesh.split("x"))
  assert results[mesh][1]["stats_meshes"] == [{"data": data, "model": model}]
  assert results["single"][1]["stats_meshes"] == ["auto"]
  want = results["single"][0]["covariance"]
  got = results[mesh][0]["covariance"]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_replace_leaves_keeps_the_sharding_of_the_leaf_it_replaces(results):
  # A NumPy leaf replacing a sharded one lands where the old leaf was; on
  # one device it is left as given.
  assert results["2x4"][1]["host_leaf"] == {"spec": ["model", None],
                                            "devices": 8}
  assert results["single"][1]["host_leaf"] == {"spec": None, "devices": 0}


def test_edit_launcher_mesh_flag(results):
  r = results["8x1"][1]["launcher"]
  assert "needs 16 devices" in r["bad_mesh"]
  assert r["placed"] == [{"data": 2, "model": 4}, True]


def test_evaluate_launcher_mesh_flag(results):
  r = results["single"][1]["launcher"]
  assert "needs 16 devices" in r["bad_mesh"]
  assert r["placed"] == [{"data": 1, "model": 1}, True]


# -- in-process: the flag's parser --------------------------------------------

@pytest.mark.parametrize("spec,want", [("2x4", (2, 4)), ("8x1", (8, 1)),
                                       (" 1X2 ", (1, 2))])
def test_parse_mesh(spec, want):
  assert sharding.parse_mesh(spec) == want


@pytest.mark.parametrize("spec", ["", "8", "2x", "x4", "0x8", "2x0", "2x4x1",
                                  "2,4", "twoxfour", "-1x8", "2.0x4"])
def test_parse_mesh_rejects(spec):
  with pytest.raises(errors.ShardingError, match="DATAxMODEL"):
    sharding.parse_mesh(spec)


def test_mesh_from_flag():
  assert sharding.mesh_from_flag(None) is None
  assert sharding.mesh_from_flag("") is None
  assert dict(sharding.mesh_from_flag("1x1").shape) == {"data": 1, "model": 1}
  with pytest.raises(errors.ShardingError, match="needs 64 devices"):
    sharding.mesh_from_flag("8x8")
