"""Writes tests/golden/editor_pins.npz: new params of five editors on fixed inputs.

Run once at commit db5db8b (editor contract v1), before the "edits as
objects" redesign, so that `tests/test_editor_pins.py` can prove the redesign
kept behaviour (issue 16). It uses the v1 call signature
(`apply(params, requests, state)`) and is kept as the record of how the pins
were made; it does not run against the v2 contract.
"""
import jax
import numpy as np

from keditjax import editors
from keditjax.editors import base, mend
from keditjax.models import tiny

REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is",
     "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda",
     "target_new": "piano"},
    {"prompt": "The capital of Norway is", "subject": "Norway",
     "target_new": "Rome"},
]
TEMPLATES = ("{}", "A short prefix. {}", "Another one here. {}")
LOOSE = dict(clamp_norm_factor=1e4, v_weight_decay=0.0,
             v_compute_dtype="float32")


def spd(f, seed):
  x = np.random.default_rng(seed).normal(size=(4 * f, f))
  return (x.T @ x / len(x)).astype(np.float32)


def changed(old, new):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(new):
    key = "/".join(p.key for p in path)
    o = np.asarray(base.get_leaf(old, key.split("/")))
    if not np.array_equal(o, np.asarray(leaf)):
      out[key] = np.asarray(leaf)
  return out


def main():
  model = tiny.tiny_lm()
  out = {}
  cov = spd(128, 5)
  rome = editors.get("rome", layer=1, v_steps=20, **LOOSE)
  state = rome.init(model, covariance=cov, templates=TEMPLATES)
  p, _, _ = rome.apply(model.params, REQUESTS[:2], state)
  out.update({f"rome:{k}": v for k, v in changed(model.params, p).items()})
  covs = {1: spd(128, 11), 2: spd(128, 12)}
  memit = editors.get("memit", layers=(1, 2), v_steps=20, **LOOSE)
  state = memit.init(model, covariance=covs, templates=TEMPLATES)
  p, _, _ = memit.apply(model.params, REQUESTS, state)
  out.update({f"memit:{k}": v for k, v in changed(model.params, p).items()})
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(128, 128)))[0]
  eig = np.concatenate([rng.uniform(1, 2, 96), np.full(32, 1e-7)])
  acov = ((basis * eig) @ basis.T).astype(np.float32)
  alpha = editors.get("alphaedit", layers=(1, 2), l2=1e-2, v_steps=20, **LOOSE)
  state = alpha.init(model, covariance={1: acov, 2: acov}, templates=TEMPLATES)
  p, state, _ = alpha.apply(model.params, REQUESTS[:2], state)
  p, state, _ = alpha.apply(p, REQUESTS[2:], state)
  out.update({f"alphaedit:{k}": v for k, v in changed(model.params, p).items()})
  ftl = editors.get("ftl", params_regex="layers_1/mlp/down_proj", steps=10,
                    lr=1e-2, radius=0.05)
  state = ftl.init(model)
  p, _, _ = ftl.apply(model.params, REQUESTS, state)
  out.update({f"ftl:{k}": v for k, v in changed(model.params, p).items()})
  mmodel = tiny.tiny_lm(embed_std=0.25)
  width = mmodel.config.hidden_size + mmodel.config.intermediate_size
  norm = {"mean": np.zeros((2, width), np.float32),
          "std": np.ones((2, width), np.float32)}
  net = mend.init_net(jax.random.key(0), num_layers=2,
                      in_dim=mmodel.config.intermediate_size,
                      out_dim=mmodel.config.hidden_size, rank=4, init_lr=1e-3)
  # A trained-looking network: perturb every leaf so the pin exercises all
  # of it (an untrained MEND's second layer is zero).
  keys = iter(jax.random.split(jax.random.key(1), 64))
  net = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape,
                                                            x.dtype), net)
  medit = editors.get("mend", layers=(2, 3), rank=4)
  state = medit.init(mmodel, trained=(net, norm))
  p, _, _ = medit.apply(mmodel.params, REQUESTS[:2], state)
  out.update({f"mend:{k}": v for k, v in changed(mmodel.params, p).items()})
  out["mend_net"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(net)])
  np.savez_compressed("tests/golden/editor_pins.npz", **out)
  for k, v in out.items():
    print(k, v.shape, float(np.abs(v).sum()))


if __name__ == "__main__":
  main()
