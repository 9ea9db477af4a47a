r"""Vision editing: edit a small CNN's predictions and measure SR/GR/DD/RR.

  python -m experiments.vision_edit --method=ftl --num_edits=20 \
      --mode=sequential --edits=flip --output_dir=runs/vision_ftl
  python -m experiments.vision_edit --method=all --num_edits=50 \
      --mode=sequential --hparams=steps=20,lr=1e-3 --output_dir=runs/vision_all

The classifier is trained once per (dataset, training flags) and cached in
$KEDITJAX_CACHE/vision. Writes DIR/results.json, DIR/summary.md and
DIR/metrics.png; `--method=all` runs ft, ftl, ftkl and ewc on the same edits,
writes each under DIR/<method>/ and plots RR and DD against the number of
edits for all of them in DIR/compare.png. --hparams=key=value,... overrides
editor hyper-parameters (with --method=all, each method takes the keys it
has).
"""

import dataclasses
import os

from absl import app, flags

from experiments import common
from keditjax import errors
from keditjax.evaluation import vision, vision_data, vision_report

flags.DEFINE_string("dataset", "mnist", f"One of {sorted(vision_data.DATASETS)}.")
flags.DEFINE_string("method", "ftl",
                    f"One of {vision.METHODS}, none (unedited) or all.")
flags.DEFINE_integer("num_edits", 20, "Edit cases.")
flags.DEFINE_string("mode", "single", f"One of {vision.MODES}.")
flags.DEFINE_string("edits", "flip", f"One of {vision.KINDS}.")
flags.DEFINE_integer("eval_every", 1, "Sequential: a step record every K edits.")
flags.DEFINE_string("hparams", "", "Editor overrides: key=value,key=value.")
flags.DEFINE_integer("kl_inputs", 512, "Training images for FT+KL's KL term.")
flags.DEFINE_integer("train_steps", 1500, "Classifier training steps.")
flags.DEFINE_integer("train_batch_size", 64, "Classifier batch size.")
flags.DEFINE_float("train_lr", 1e-3, "Classifier Adam learning rate.")
flags.DEFINE_float("label_smoothing", 0.1, "Classifier label smoothing.")
flags.DEFINE_string("flip_to", "runner_up", "Flip edits' new class: runner_up "
                    "(the model's second choice) or random.")
flags.DEFINE_integer("seed", 0, "Split, training and case-order seed.")
flags.DEFINE_string("output_dir", None, "Where to write results.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def build():
  """Checks every flag and builds the editors, before any work."""
  if FLAGS.dataset not in vision_data.DATASETS:
    raise errors.ConfigError(f"--dataset={FLAGS.dataset!r}; use one of "
                             f"{sorted(vision_data.DATASETS)}.")
  for name, valid in (("mode", vision.MODES), ("edits", vision.KINDS),
                      ("flip_to", vision_data.FLIP_TARGETS)):
    if getattr(FLAGS, name) not in valid:
      raise errors.ConfigError(f"--{name}={getattr(FLAGS, name)!r}; use one "
                               f"of {valid}.")
  test_size = vision_data.DATASETS[FLAGS.dataset][1]
  if not 1 <= FLAGS.num_edits <= test_size:
    raise errors.ConfigError(f"--num_edits={FLAGS.num_edits} must be in [1, "
                             f"{test_size}] (the {FLAGS.dataset} test split).")
  if FLAGS.method == "none":
    return {"none": None}
  if FLAGS.method not in vision.METHODS + ("all",):
    raise errors.ConfigError(f"--method={FLAGS.method!r}; use one of "
                             f"{vision.METHODS}, none or all.")
  methods = vision.METHODS if FLAGS.method == "all" else (FLAGS.method,)
  return vision.build_editors(methods, vision.parse_hparams(FLAGS.hparams))


def main(argv):
  del argv
  common.setup()
  built = build()
  setup = vision.prepare(
      FLAGS.dataset, num_edits=FLAGS.num_edits, edits=FLAGS.edits,
      flip_to=FLAGS.flip_to, seed=FLAGS.seed, train_steps=FLAGS.train_steps,
      train_batch_size=FLAGS.train_batch_size, train_lr=FLAGS.train_lr,
      label_smoothing=FLAGS.label_smoothing, kl_inputs=FLAGS.kl_inputs)
  data, classifier = setup.data, setup.classifier
  all_results = {}
  for method, editor in built.items():
    results = vision.run_vision(
        classifier, editor, setup.cases, mode=FLAGS.mode,
        eval_every=FLAGS.eval_every,
        test_images=data.test_images, test_labels=data.test_labels,
        init_kwargs=setup.init_kwargs)
    results["protocol"].update(edits=FLAGS.edits, dataset=FLAGS.dataset,
                               flip_to=FLAGS.flip_to)
    results["hparams"] = editor and dataclasses.asdict(editor.hparams)
    results["classifier"] = dict(setup.trained,
                                 test_accuracy=setup.test_accuracy)
    all_results[method] = results
  title = f"{FLAGS.dataset} {FLAGS.edits} ({FLAGS.mode})"
  if FLAGS.method == "all":
    paths = vision_report.write_comparison(all_results, FLAGS.output_dir, title)
  else:
    paths = vision_report.write(results, FLAGS.output_dir, title)
  print(open(paths["summary"]).read())
  print("wrote", ", ".join(os.path.relpath(p) for p in paths.values()))


if __name__ == "__main__":
  app.run(main)
