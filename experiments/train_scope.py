r"""Train SERAC's scope classifier on the training splits and ship it.

  python -m experiments.train_scope                      # writes the asset
  python -m experiments.train_scope --output=/tmp/scope.npz --steps=300

Reads CounterFact train and zsRE train (never the edit splits), trains the
projection and scale of `keditjax.training.scope` with the shared trainer,
measures routing on held-out training records, and writes OUTPUT (.npz) and
its record (.json: config, seconds, validation before/after training). The
default OUTPUT is the classifier the SERAC editor loads when
`serac.classifier` is empty.
"""

import json

from absl import app, flags

from experiments import common
from keditjax import models
from keditjax.editors import serac
from keditjax.evaluation import scope_training
from keditjax.training import scope

flags.DEFINE_string("output", serac.ASSET, "Where to write the classifier (.npz).")
flags.DEFINE_string("encoder", serac.SeracHParams().encoder, "Sentence encoder.")
flags.DEFINE_integer("per_dataset", scope.ScopeConfig.per_dataset,
                     "Training records per split.")
flags.DEFINE_integer("steps", scope.ScopeConfig.steps, "Training steps.")
flags.DEFINE_float("lr", scope.ScopeConfig.lr, "Adam learning rate.")
flags.DEFINE_integer("valid", 200, "Held-out training records per split.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  if not FLAGS.output.endswith(".npz"):
    raise app.UsageError("--output must end in .npz")
  config = scope.ScopeConfig(per_dataset=FLAGS.per_dataset, steps=FLAGS.steps,
                             lr=FLAGS.lr)
  encoder = models.load(FLAGS.encoder)
  params, info = scope_training.fit(encoder, config, valid=FLAGS.valid)
  info["command"] = {"encoder": FLAGS.encoder, "per_dataset": FLAGS.per_dataset,
                     "steps": FLAGS.steps, "lr": FLAGS.lr, "valid": FLAGS.valid}
  scope.save(FLAGS.output, params, info)
  print(json.dumps(info["validation"], indent=1))
  print("wrote", FLAGS.output)


if __name__ == "__main__":
  app.run(main)
