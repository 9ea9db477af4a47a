"""Editor contract v2 keeps behaviour: new params equal the v1 pins.

tests/golden/editor_pins.npz was written by tools/make_editor_pins.py with
the v1 contract (`apply(params, requests, state)`), before the "edits as
objects" redesign. This file runs the same computation with the v2 contract
(`apply(model, params, requests, state)`) and checks every pinned leaf, and
that no other leaf changed.
"""

import os

import jax
import numpy as np
import pytest

from keditjax import editors
from keditjax.editors import base, mend
from keditjax.models import tiny
# The very inputs the pins were made from (only constants are imported: the
# script's own calls use the v1 contract).
from tools.make_editor_pins import LOOSE, REQUESTS, TEMPLATES, spd

PINS = os.path.join(os.path.dirname(__file__), "golden", "editor_pins.npz")
@pytest.fixture(scope="module")
def pins():
  return dict(np.load(PINS))


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_lm()


def check(pins, method, old, new):
  """Every pinned leaf of `method` matches; every other leaf is unchanged."""
  pinned = {k.split(":", 1)[1]: v for k, v in pins.items()
            if k.startswith(method + ":")}
  assert pinned
  for path, leaf in jax.tree_util.tree_leaves_with_path(new):
    key = "/".join(p.key for p in path)
    if key in pinned:
      # The edit (new - old) against the pinned edit, relative to its size:
      # the pins came from an AVX-512 CPU, and XLA's CPU code for another
      # instruction set rounds differently (~1e-5 after 20 Adam steps of
      # v*); a change of behaviour moves the edit by O(1) of its norm.
      before = np.asarray(base.get_leaf(old, key.split("/")))
      want = pinned.pop(key) - before
      got = np.asarray(leaf) - before
      assert np.linalg.norm(want) > 0, f"{method}: {key} pinned unchanged"
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert err < 1e-4, f"{method}: {key} edit differs by {err:.2e} of its norm"
    else:
      np.testing.assert_array_equal(
          np.asarray(leaf), np.asarray(base.get_leaf(old, key.split("/"))),
          err_msg=f"{method}: {key} changed")
  assert not pinned, f"{method}: pinned leaves missing: {sorted(pinned)}"


def test_rome(pins, model):
  rome = editors.get("rome", layer=1, v_steps=20, **LOOSE)
  state = rome.init(model, covariance=spd(128, 5), templates=TEMPLATES)
  p, _, _ = rome.apply(model, model.params, REQUESTS[:2], state)
  check(pins, "rome", model.params, p)


def test_memit(pins, model):
  # The pins predate the per-type key weighting (MemitHParams.key_weighting).
  memit = editors.get("memit", layers=(1, 2), v_steps=20, key_weighting="flat",
                      **LOOSE)
  state = memit.init(model, covariance={1: spd(128, 11), 2: spd(128, 12)},
                     templates=TEMPLATES)
  p, _, _ = memit.apply(model, model.params, REQUESTS, state)
  check(pins, "memit", model.params, p)


def test_alphaedit_two_applies(pins, model):
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(128, 128)))[0]
  eig = np.concatenate([rng.uniform(1, 2, 96), np.full(32, 1e-7)])
  acov = ((basis * eig) @ basis.T).astype(np.float32)
  alpha = editors.get("alphaedit", layers=(1, 2), l2=1e-2, v_steps=20,
                      key_weighting="flat", **LOOSE)
  state = alpha.init(model, covariance={1: acov, 2: acov},
                     templates=TEMPLATES)
  p, state, _ = alpha.apply(model, model.params, REQUESTS[:2], state)
  p, state, _ = alpha.apply(model, p, REQUESTS[2:], state)
  check(pins, "alphaedit", model.params, p)


def test_ftl(pins, model):
  ftl = editors.get("ftl", params_regex="layers_1/mlp/down_proj", steps=10,
                    lr=1e-2, radius=0.05)
  state = ftl.init(model)
  p, _, _ = ftl.apply(model, model.params, REQUESTS, state)
  check(pins, "ftl", model.params, p)


def test_mend(pins):
  mmodel = tiny.tiny_lm(embed_std=0.25)
  width = mmodel.config.hidden_size + mmodel.config.intermediate_size
  norm = {"mean": np.zeros((2, width), np.float32),
          "std": np.ones((2, width), np.float32)}
  net = mend.init_net(jax.random.key(0), num_layers=2,
                      in_dim=mmodel.config.intermediate_size,
                      out_dim=mmodel.config.hidden_size, rank=4, init_lr=1e-3)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  net = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(
      next(keys), x.shape, x.dtype), net)
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(net)]),
      pins["mend_net"])
  medit = editors.get("mend", layers=(2, 3), rank=4)
  state = medit.init(mmodel, trained=(net, norm))
  p, _, _ = medit.apply(mmodel, mmodel.params, REQUESTS[:2], state)
  check(pins, "mend", mmodel.params, p)
