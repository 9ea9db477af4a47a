r"""Evaluate an editing method on a dataset under one of the edit protocols.

  python -m experiments.evaluate --model=smollm2-135m --method=rome \
      --dataset=counterfact --num_edits=500 --mode=single --output_dir=runs/rome
  python -m experiments.evaluate --method=memit --dataset=counterfact \
      --num_edits=1000 --batch_size=100 --mode=sequential --output_dir=runs/memit_seq
  python -m experiments.evaluate --method=none --dataset=zsre --num_edits=500 \
      --output_dir=runs/unedited_zsre

Modes: `single` (each case edited into the unedited model alone), `batch`
(groups of --batch_size, each into the unedited model), `sequential` (groups
of --batch_size edited on top of each other; SR/RR/DD recorded every
--eval_every steps). `--method=none` scores the unedited model.

Writes DIR/results.json ({"protocol", "n", "metrics", "cases", "steps",
"heldout", "timing"}; metrics in percent, DD in points), DIR/summary.md and
DIR/metrics.png. Editor hyper-parameters: --config.<method>.<field>=...
`--mesh=DATAxMODEL` (e.g. 2x4) shards the model over a device mesh.
"""

import dataclasses
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, errors, models, sharding
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import protocols, report

DATASETS = ("counterfact", "zsre", "mquake", "qaedit", "jsonl")
FAMILIES = {"counterfact": ("counterfact", "token", "survey"),
            "zsre": ("zsre", "token", "survey"),
            "mquake": ("counterfact", "token", "survey"),
            "qaedit": ("zsre", "token", "survey"),
            "jsonl": ("counterfact", "token", "zsre", "survey")}

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit (name, path or hf:dir).")
flags.DEFINE_enum("method", "rome", ["none"] + list(editors.METHODS),
                  "Editing method (none: the unedited model).")
flags.DEFINE_enum("dataset", "counterfact", DATASETS, "Dataset schema.")
flags.DEFINE_string("data_path", None, "Data file (default: the bundled one); "
                    "also hf:<name>[:<split>].")
flags.DEFINE_integer("start", 0, "First record to edit.")
flags.DEFINE_integer("num_edits", 100, "Number of cases to edit.")
flags.DEFINE_integer("batch_size", 1, "Cases per edit call (batch, sequential).")
flags.DEFINE_enum("mode", "single", list(protocols.MODES), "Edit protocol.")
flags.DEFINE_integer("eval_every", None, "Sequential: SR/RR/DD over all edits "
                     "so far every K steps (default: 10 checkpoints; 0: at the end only).")
flags.DEFINE_integer("dd_every", 10, "Non-successive: held-out DD on every K-th "
                     "edited model (0: never).")
flags.DEFINE_string("heldout", "known_1000", "DD held-out facts: known_1000 "
                    "(facts the model was probed on; ~22% known by the default "
                    "model, so DD can reach ~22 points), auto (true facts of the "
                    "next --heldout_size records of the same file: CounterFact's "
                    "are known 3-6%, so DD there cannot exceed that), none, or "
                    "a file path. Results state each set's ceiling (dd_ceiling).")
flags.DEFINE_integer("heldout_size", 100, "Held-out facts for DD.")
flags.DEFINE_list("families", None, "Metric families (default: by dataset).")
flags.DEFINE_bool("fluency", None, "Generate and report fluency (default: on "
                  "for counterfact).")
flags.DEFINE_integer("fluency_tokens", 50, "Tokens per fluency generation.")
flags.DEFINE_integer("scoring_batch", 64, "Rows per scoring forward pass.")
flags.DEFINE_integer("seed", 0, "Sampling seed for fluency generations.")
flags.DEFINE_string("output_dir", None, "Where to write results.")
flags.DEFINE_string("mesh", None, "Shard the model over a DATAxMODEL device "
                    "mesh, e.g. 2x4 (keditjax.sharding rules; default: one device).")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py",
                                "Editor hyper-parameters.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def heldout_facts(dataset, data_path, edited_end):
  """The DD held-out set named by --heldout (None for none)."""
  choice, size = FLAGS.heldout, FLAGS.heldout_size
  if choice == "none" or size == 0:
    return None
  if choice == "known_1000":
    return cases_lib.load_facts(None, limit=size)
  if choice == "auto":
    if dataset in ("jsonl", "qaedit"):  # no old answers to hold out
      return None
    path = data_path or cases_lib.default_path(dataset)
    facts = cases_lib.load_facts(path, limit=size, start=edited_end)
    if len(facts) < size:
      raise errors.InputError(
          f"--heldout=auto needs {size} records after the edited ones in "
          f"{path}; only {len(facts)} remain. Lower --heldout_size.")
    return facts
  return cases_lib.load_facts(choice, limit=size)


def build(argv=None):
  """Everything checked and loaded before any editing starts."""
  del argv
  protocol = protocols.Protocol(
      mode=FLAGS.mode, batch_size=FLAGS.batch_size, eval_every=FLAGS.eval_every,
      dd_every=FLAGS.dd_every,
      families=tuple(FLAGS.families or FAMILIES[FLAGS.dataset]),
      fluency=(FLAGS.dataset == "counterfact" if FLAGS.fluency is None
               else FLAGS.fluency),
      fluency_tokens=FLAGS.fluency_tokens, scoring_batch=FLAGS.scoring_batch,
      seed=FLAGS.seed).validate()
  cases = cases_lib.load_cases(FLAGS.dataset, FLAGS.data_path,
                               limit=FLAGS.num_edits, start=FLAGS.start)
  heldout = heldout_facts(FLAGS.dataset, FLAGS.data_path,
                          FLAGS.start + FLAGS.num_edits)
  editor = None
  if FLAGS.method != "none":
    editor = editors.get(FLAGS.method,
                         editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  return protocol, cases, heldout, editor, sharding.mesh_from_flag(FLAGS.mesh)


def main(argv):
  common.setup()
  protocol, cases, heldout, editor, mesh = build(argv)
  model = models.load(FLAGS.model)
  if mesh is not None:
    model = sharding.shard_model(model, mesh)
  results = protocols.run(model, editor, cases, protocol, heldout=heldout)
  results["command"] = {"model": FLAGS.model, "dataset": FLAGS.dataset,
                        "data_path": FLAGS.data_path, "start": FLAGS.start,
                        "num_edits": FLAGS.num_edits, "heldout": FLAGS.heldout,
                        "heldout_size": FLAGS.heldout_size}
  if editor is not None:
    # The editor's own hparams: for MEND, the loaded network's rank and layers.
    results["hparams"] = dataclasses.asdict(editor.hparams)
  paths = report.write(results, FLAGS.output_dir,
                       title=f"{results['method']} on {FLAGS.dataset}")
  print(open(paths["summary"]).read())
  print("wrote", ", ".join(os.path.relpath(p) for p in paths.values()))


if __name__ == "__main__":
  app.run(main)
