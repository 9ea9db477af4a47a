r"""UltraEdit layer / step sweep for the default model (RESULTS.md, "UltraEdit").

  python -m experiments.ultraedit_sweep --output=docs/results/ultraedit_sweep.json

Each setting edits --num_edits CounterFact records (from --start, outside the
first 1,000 that the lifelong runs use) in sequential turns of --batch_size
into the unedited model and scores efficacy / paraphrase / neighbourhood
(teacher-forced, CounterFact's probability comparisons) on the final model.
"""

import itertools
import json

from absl import app, flags

from experiments import common
from keditjax import editors, models
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import protocols

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model.")
flags.DEFINE_integer("start", 1000, "First CounterFact record.")
flags.DEFINE_integer("num_edits", 100, "Edits per setting.")
flags.DEFINE_integer("batch_size", 10, "Edits per turn.")
flags.DEFINE_list("lrs", ["1e-4", "3e-4"], "Steps to try.")
flags.DEFINE_list("layer_sets", ["23-27", "25-29", "18-22"], "Layer ranges a-b.")
flags.DEFINE_list("tokens", ["all"], "Token sets to try.")
flags.DEFINE_list("ridges", ["1"], "Ridge strengths to try.")
flags.DEFINE_string("output", None, "JSON to write.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  model = models.load(FLAGS.model)
  cases = cases_lib.load_cases("counterfact", None, limit=FLAGS.num_edits,
                               start=FLAGS.start)
  protocol = protocols.Protocol(mode="sequential", batch_size=FLAGS.batch_size,
                                eval_every=0, fluency=False,
                                families=("counterfact",))
  rows = []
  base = protocols.run(model, None, cases, protocol, progress=False)
  rows.append({"setting": "unedited", **base["metrics"]})
  for lr, span, tokens, ridge in itertools.product(
      FLAGS.lrs, FLAGS.layer_sets, FLAGS.tokens, FLAGS.ridges):
    a, b = map(int, span.split("-"))
    editor = editors.get("ultraedit", layers=tuple(range(a, b + 1)),
                         lr=float(lr), tokens=tokens, ridge=float(ridge))
    out = protocols.run(model, editor, cases, protocol, progress=False)
    row = {"setting": f"lr={lr} layers={span} tokens={tokens} ridge={ridge}",
           "lr": float(lr), "layers": [a, b], "tokens": tokens,
           "ridge": float(ridge),
           **out["metrics"],
           "edit_seconds": out["timing"]["edit_seconds"]}
    print({k: (round(v, 1) if isinstance(v, float) else v)
           for k, v in row.items() if k in ("setting", "efficacy_score",
                                            "paraphrase_score",
                                            "neighborhood_score")}, flush=True)
    rows.append(row)
  with open(FLAGS.output, "w") as f:
    json.dump({"command": {k: FLAGS[k].value for k in (
        "model", "start", "num_edits", "batch_size", "lrs", "layer_sets",
        "tokens", "ridges")}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
