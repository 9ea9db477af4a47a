r"""Lifelong editing: 1,000+ successive edits with checkpoints and curves.

  python -m experiments.lifelong --method=alphaedit --num_edits=1000 \
      --batch_size=100 --workdir=runs/lifelong_alphaedit_b100
  python -m experiments.lifelong --method=ultraedit --num_edits=1000 \
      --batch_size=100 --workdir=runs/lifelong_ultraedit_b100

Every --checkpoint_every edits: efficacy / paraphrase / neighbourhood on the
edits so far (--sample: a fixed random sample of them before the last
checkpoint), retain rate, perplexity on held-out WikiText-2 text and accuracy
on known_1000 facts (DD, with its ceiling); a checkpoint in --workdir. Run the
same command again after a kill: it resumes from the last checkpoint (other
settings are refused, by name). Writes WORKDIR/results.json and
WORKDIR/curves.png (keditjax.evaluation.lifelong).
"""

import dataclasses
import json
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import lifelong, report

FAMILIES = {"counterfact": ("counterfact",), "zsre": ("zsre", "token")}
flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "alphaedit", list(editors.METHODS), "Method.")
flags.DEFINE_enum("dataset", "counterfact", list(FAMILIES), "Dataset schema.")
flags.DEFINE_string("data_path", None, "Data file (default: the bundled one).")
flags.DEFINE_integer("start", 0, "First record to edit.")
flags.DEFINE_integer("num_edits", 1000, "Edits in all.")
flags.DEFINE_integer("batch_size", 100, "Edits per turn.")
flags.DEFINE_integer("checkpoint_every", 100, "Edits between checkpoints.")
flags.DEFINE_integer("sample", 0, "Score at most this many edits so far at "
                     "checkpoints before the last (0: all).")
flags.DEFINE_integer("known_size", 200, "known_1000 facts for general ability "
                     "(0: none).")
flags.DEFINE_integer("ppl_tokens", 8192, "Held-out WikiText-2 test tokens for "
                     "perplexity (0: none).")
flags.DEFINE_string("workdir", None, "Checkpoints and results.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py",
                                "Editor hyper-parameters.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def plot(out: dict, path: str) -> None:
  """Curves against the number of edits (unedited model dashed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  points, base = out["checkpoints"], out["baseline"]
  x = [p["edits"] for p in points]
  panels = [("efficacy_score", "paraphrase_score", "neighborhood_score",
             "rewrite_acc", "rephrase_acc", "locality_acc", "rr"),
            ("known_accuracy",), ("perplexity",)]
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for ax, keys in zip(axes, panels):
    for key in keys:
      ys = [p.get(key) for p in points]
      if all(y is None for y in ys):
        continue
      line, = ax.plot(x, [float("nan") if y is None else y for y in ys],
                      marker="o", label=key)
      if isinstance(base.get(key), float):
        ax.axhline(base[key], ls="--", color=line.get_color(), lw=0.8)
    ax.set_xlabel("edits")
    ax.legend(fontsize=7)
  axes[0].set_title("edits so far (%)")
  axes[1].set_title("known_1000 accuracy (%)")
  axes[2].set_title("WikiText-2 test perplexity")
  fig.suptitle(f"{out['method']}, turns of {out['plan']['batch_size']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  common.setup()
  plan = lifelong.Plan(batch_size=FLAGS.batch_size,
                       checkpoint_every=FLAGS.checkpoint_every,
                       sample=FLAGS.sample,
                       families=FAMILIES[FLAGS.dataset]).validate()
  cases = cases_lib.load_cases(FLAGS.dataset, FLAGS.data_path,
                               limit=FLAGS.num_edits, start=FLAGS.start)
  known = (cases_lib.load_facts(None, limit=FLAGS.known_size)
           if FLAGS.known_size else None)
  editor = editors.get(FLAGS.method,
                       editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  model = models.load(FLAGS.model)
  ppl_rows = (lifelong.heldout_text_rows(model, FLAGS.ppl_tokens)
              if FLAGS.ppl_tokens else None)
  settings = {"model_name": FLAGS.model, "dataset": FLAGS.dataset,
              "data_path": FLAGS.data_path, "start": FLAGS.start,
              "known_size": FLAGS.known_size, "ppl_tokens": FLAGS.ppl_tokens}
  path = os.path.join(FLAGS.workdir, "results.json")

  def write(out):  # after every checkpoint: a long run can be followed
    out = dict(out, hparams=dataclasses.asdict(editor.hparams),
               command=dict(settings, method=FLAGS.method,
                            num_edits=FLAGS.num_edits,
                            batch_size=FLAGS.batch_size,
                            checkpoint_every=FLAGS.checkpoint_every,
                            sample=FLAGS.sample))
    with open(path + ".tmp", "w") as f:
      json.dump(report._plain(out), f, indent=1)  # pylint: disable=protected-access
    os.replace(path + ".tmp", path)
    plot(out, os.path.join(FLAGS.workdir, "curves.png"))
    return out

  out = lifelong.run(model, editor, cases, plan, known=known,
                     ppl_rows=ppl_rows, workdir=FLAGS.workdir,
                     settings=settings, on_results=write)
  del out["params"], out["state"]
  out = write(out)
  keys = ("edits", "efficacy_score", "paraphrase_score", "neighborhood_score",
          "rewrite_acc", "rephrase_acc", "locality_acc", "rr",
          "known_accuracy", "perplexity", "edit_seconds_total")
  print(" | ".join(keys))
  for p in [out["baseline"]] + out["checkpoints"]:
    print(" | ".join("" if p.get(k) is None else
                     f"{p[k]:.1f}" if isinstance(p.get(k), float) else
                     str(p[k]) for k in keys))
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
