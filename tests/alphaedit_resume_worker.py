"""AlphaEdit resumed in a new process (tests/test_editor_contract.py).

  python tests/alphaedit_resume_worker.py DIR

reads `DIR/state` (an AlphaEdit state saved with `state_io.save_state`) and
`DIR/params.npz` (the params after the first `SPLIT` edits), applies edits
`SPLIT..N-1` one request per apply and writes `DIR/final.npz`. The setup
(model, editor, requests) is shared with the test through this module.
"""

import os
import sys

import jax
import numpy as np

from keditjax import editors
from keditjax.editors import base, state_io
from keditjax.models import tiny

N, SPLIT = 20, 10
TEMPLATES = ("{}", "A short prefix. {}")
REQUESTS = [{"prompt": f"Name{i:02d} lives in", "subject": f"Name{i:02d}",
             "target_new": f"city{i:02d}"} for i in range(N)]


def setup():
  """`(model, editor, covariance)` of the resume test."""
  model = tiny.tiny_lm()
  editor = editors.get(
      "alphaedit", layers=(1, 2), l2=1e-2, v_steps=5, clamp_norm_factor=1e4,
      v_weight_decay=0.0, v_compute_dtype="float32")
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(128, 128)))[0]
  eig = np.concatenate([rng.uniform(1, 2, 96), np.full(32, 1e-7)])
  cov = ((basis * eig) @ basis.T).astype(np.float32)
  return model, editor, {1: cov, 2: cov}


def run(model, editor, params, state, start: int, stop: int):
  """Edits `start..stop-1`, one request per apply."""
  for i in range(start, stop):
    params, state, _ = editor.apply(model, params, [REQUESTS[i]], state)
  return params, state


def flat(params) -> dict:
  return {"/".join(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def unflat(model, arrays) -> dict:
  return base.replace_leaves(model.params, {
      tuple(k.split("/")): v for k, v in arrays.items()})


def main(directory: str) -> None:
  model, editor, _ = setup()
  state = state_io.load_state(os.path.join(directory, "state"), editor, model)
  params = unflat(model, dict(np.load(os.path.join(directory, "params.npz"))))
  params, state = run(model, editor, params, state, SPLIT, N)
  assert int(state.num_edits) == N, state.num_edits
  np.savez(os.path.join(directory, "final.npz"), **flat(params))


if __name__ == "__main__":
  main(sys.argv[1])
