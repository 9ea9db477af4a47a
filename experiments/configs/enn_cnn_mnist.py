"""Editable training (ENN) of the vision CNN on MNIST-5k.

  python -m experiments.enn_edit --output_dir=runs/enn
  python -m experiments.train_hypernet \
      --config=experiments/configs/enn_cnn_mnist.py

Starts from the ordinary CNN that `vision.prepare` trains (same `base`
fields, so the cached weights are reused) and meta-trains all of it so that
`inner_steps` SGD steps of size `inner_lr` on `dense1/kernel` make a flip
hold (see keditjax/editors/enn.py, keditjax/evaluation/enn_training.py).
"""

import ml_collections

from keditjax.evaluation import enn_training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The fields and their defaults live in `enn_training.default_config()`:
  the ordinary CNN (`base`, as `vision.prepare`), the editor
  (`params_regex`, `inner_steps`, `inner_lr`, `inner_optimizer`, `margin`,
  `max_steps`), the objective (`c_edit`, `c_loc`, `label_smoothing`), the
  batches and `train` (1,000 Adam steps at 3e-4)."""
  del arg
  return enn_training.default_config()
