"""How much of the preserved keys' energy AlphaEdit's "null space" holds.

  python -m experiments.nullspace_energy \
      --output=docs/results/alphaedit_nullspace_energy.json

For each AlphaEdit layer of the model (the hparams' `layers`, the same
E[kkᵀ] statistics the editor uses, cached by `keditjax.stats`) and each
relative threshold: the null-space dimension and tr(PC)/tr(C), the share of
E‖k‖² inside it (`linalg.null_space_energy`). AlphaEdit assumes this share is
near 0; each unit of it is output change on preserved text that the
projection does not prevent.
"""

import json

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from keditjax import editors, models
from keditjax.editors import rome
from keditjax.kernels import linalg

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model.")
flags.DEFINE_list("thresholds", ["1e-2", "7e-3", "5e-3"],
                  "Relative thresholds (× the largest eigenvalue).")
flags.DEFINE_string("output", None, "JSON to write.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  model = models.load(FLAGS.model)
  hp = editors.hparams_class("alphaedit")()
  covs = rome.load_covariance(model, model.params, list(hp.layers), hp)
  rows = []
  for layer in hp.layers:
    cov = jnp.asarray(covs[layer], jnp.float32)
    eig = np.linalg.eigvalsh(np.asarray(covs[layer], np.float64))
    for t in map(float, FLAGS.thresholds):
      _, dim = linalg.null_space_projector(cov, t * float(eig[-1]))
      rows.append({"layer": layer, "threshold": t, "dims": dim,
                   "features": int(eig.size),
                   "energy_share": 100 * linalg.null_space_energy(
                       cov, t * float(eig[-1])),
                   "min_over_max": float(eig[0] / eig[-1]),
                   "top_share": float(100 * eig[-1] / eig.sum())})
      print(rows[-1], flush=True)
  with open(FLAGS.output, "w") as f:
    json.dump({"command": {"model": FLAGS.model,
                           "thresholds": FLAGS.thresholds,
                           "layers": list(hp.layers),
                           "mom2_tokens": hp.mom2_tokens},
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
