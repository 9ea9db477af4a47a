r"""Flip a MiniLM fact checker's FEVER verdicts: KnowledgeEditor, MEND, FT-L.

  python -m experiments.fact_check_edit --output_dir=runs/fever \
      --num_edits=100 --config.train.steps=600

Trains (or loads) the fact checker; trains KnowledgeEditor and MEND with
`training.train` (DIR/knowledge_editor_train, DIR/mend_train) on the same
data (`evaluation.fever_training`); picks FT-L's radius on dev edits;
applies each method to the same single test edits; writes DIR/results.json
and DIR/summary.md.
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from keditjax import editors
from keditjax.editors import knowledge_editor as ke
from keditjax.evaluation import fever, fever_training

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs",
                           "knowledge_editor_minilm_fever.py"))
flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
flags.DEFINE_integer("num_edits", 100, "Test edits per method.")
flags.DEFINE_integer("sweep_edits", 20, "Dev edits of FT-L's radius sweep.")
flags.DEFINE_list("ftl_radii", ["1e-3", "3e-3", "1e-2", "3e-2"], "FT-L radii.")
flags.DEFINE_integer("retained", 0, "Test claims DD is measured on (0: all).")
flags.DEFINE_integer("sweep_retained", 400, "Dev claims of the sweep's DD.")
flags.DEFINE_integer("mend_steps", 600, "MEND training steps.")
FLAGS = flags.FLAGS


def edit_fn(checker, editor, **init):
  """`(params, case) -> new_params`: `editor` on the checker."""
  state = editor.init(checker, **init)
  return lambda params, case: editor.apply(checker, params, case.request(),
                                           state)[0]


def ftl(checker, radius):
  return edit_fn(checker, editors.get(
      "ftl", params_regex=checker.default_edit_regex, radius=radius, lr=1e-3,
      steps=25, stop_on="argmax"))


def main(_):
  common.setup()
  config, out = _CONFIG.value, FLAGS.output_dir
  os.makedirs(out, exist_ok=True)
  splits = fever.split(fever.load(config.fever_path), seed=config.split_seed)
  checker = fever_training.load_checker(config, splits)
  ke_params, _, ke_train = fever_training.train(
      fever_training.build_knowledge_editor, config, checker, splits,
      os.path.join(out, "knowledge_editor_train"))
  mend_config = fever_training.mend_classifier_config()  # same data, checker
  for key in fever_training.SHARED_FIELDS:
    mend_config[key] = config[key]
  mend_config.train.steps = FLAGS.mend_steps
  mend_config.train.progress = config.train.progress
  nets, mend_objective, mend_train = fever_training.train(
      fever_training.build_mend_classifier, mend_config, checker, splits,
      os.path.join(out, "mend_train"))
  dev = fever.make_evaluation(checker, splits["dev"], FLAGS.sweep_edits,
                              seed=1, retained=FLAGS.sweep_retained)
  sweep = {r: dev.run(ftl(checker, r), desc=f"ftl sweep r={r:g}")[0]
           for r in map(float, FLAGS.ftl_radii)}
  radius = fever.choose(sweep)
  methods = {  # name -> (edit_fn, extra fields of its results)
      "knowledge_editor": (edit_fn(checker, editors.get(
          "knowledge_editor", ke.hparams_from_config(config)),
          trained=ke_params), {"training": ke_train}),
      "mend": (edit_fn(checker, editors.get("mend_classifier"), trained=(
          nets, mend_objective.frozen["norm"])), {"training": mend_train}),
      "ftl": (ftl(checker, radius), {"radius": radius, "sweep": {
          f"{r:g}": m for r, m in sweep.items()}})}
  test = fever.make_evaluation(checker, splits["test"], FLAGS.num_edits,
                               seed=0, retained=FLAGS.retained)
  results = {"classifier": {"test_accuracy": fever.accuracy(
      checker, splits["test"])}, "methods": {}}
  for name, (fn, extra) in methods.items():
    t0 = time.perf_counter()
    metrics, _ = test.run(fn, desc=name)
    results["methods"][name] = {"metrics": metrics, **extra,
                                "seconds": time.perf_counter() - t0}
  summary = fever.summary_markdown(results, FLAGS.num_edits)
  for name, text in (("results.json", json.dumps(results, indent=2)),
                     ("summary.md", summary)):
    with open(os.path.join(out, name), "w") as f:
      f.write(text)
  print(summary)


if __name__ == "__main__":
  app.run(main)
