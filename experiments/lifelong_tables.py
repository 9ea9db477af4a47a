r"""RESULTS.md tables and plots for lifelong, WILD, MQuAKE and sweep JSONs.

  python -m experiments.lifelong_tables \
      --lifelong=docs/results/lifelong_alphaedit_b100.json,... \
      --wild=docs/results/wild_rome_qaedit100_single.json,... \
      --mquake=docs/results/mquake.json \
      --sweeps=docs/results/ultraedit_sweep_answer.json \
      --batch=docs/results/batch_curve.json \
      --plot=docs/results/lifelong_curves.png

Prints one Markdown table per JSON (tests/test_results_docs.py regenerates
every cell from the same JSON) and draws the lifelong curves of all methods
in one figure.
"""

import json

from absl import app, flags

from experiments.lifelong_render import (batch_plot, batch_table, lifelong_table,
                                         mquake_table, nullspace_table, plot,
                                         sweep_table, wild_table)

flags.DEFINE_list("lifelong", [], "experiments.lifelong results.json copies.")
flags.DEFINE_list("wild", [], "experiments.wild JSONs.")
flags.DEFINE_string("mquake", None, "experiments.mquake JSON.")
flags.DEFINE_list("sweeps", [], "experiments.ultraedit_sweep JSONs.")
flags.DEFINE_string("batch", None, "experiments.batch_curve JSON.")
flags.DEFINE_string("batch_plot", None, "PNG of the batch-size curve.")
flags.DEFINE_string("nullspace", None, "experiments.nullspace_energy JSON.")
flags.DEFINE_string("plot", None, "PNG of the lifelong curves.")
FLAGS = flags.FLAGS

def main(argv):
  del argv
  runs = []
  for path in FLAGS.lifelong:
    with open(path) as f:
      runs.append(json.load(f))
    print(f"\n{path}\n")
    print("\n".join(lifelong_table(runs[-1])))
  for path in FLAGS.wild:
    with open(path) as f:
      print(f"\n{path}\n\n" + "\n".join(wild_table(json.load(f))))
  if FLAGS.mquake:
    with open(FLAGS.mquake) as f:
      print(f"\n{FLAGS.mquake}\n\n" + "\n".join(mquake_table(json.load(f))))
  for path in FLAGS.sweeps:
    with open(path) as f:
      print(f"\n{path}\n\n" + "\n".join(sweep_table(json.load(f))))
  if FLAGS.batch:
    with open(FLAGS.batch) as f:
      batch = json.load(f)
    print(f"\n{FLAGS.batch}\n\n" + "\n".join(batch_table(batch)))
    if FLAGS.batch_plot:
      batch_plot(batch, FLAGS.batch_plot)
  if FLAGS.nullspace:
    with open(FLAGS.nullspace) as f:
      print(f"\n{FLAGS.nullspace}\n\n" +
            "\n".join(nullspace_table(json.load(f))))
  if FLAGS.plot and runs:
    plot(runs, FLAGS.plot)
    print("wrote", FLAGS.plot)


if __name__ == "__main__":
  app.run(main)
