r"""Teacher-forced and in-the-wild (generated) metrics, side by side.

  python -m experiments.wild --method=rome --dataset=qaedit --num_edits=100 \
      --mode=single --output=runs/wild_rome_qaedit_single.json
  python -m experiments.wild --method=alphaedit --dataset=qaedit \
      --num_edits=100 --mode=sequential --batch_size=10 --output=...

single: each case is edited into the unedited model and measured on that
model; sequential: all cases are edited one turn (--batch_size) after another
and measured on the final model. Teacher-forced: token accuracy (rewrite /
rephrase / locality vs the unedited model) and all-tokens-right (SR, GR).
WILD (keditjax.evaluation.wild_eval): greedy generation in three context
forms, judged by normalised exact match and containment; locality = the
unedited model's answer kept. `--method=none` measures the unedited model.
"""

import dataclasses
import json
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax import progress as progress_lib
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import evaluator, wild_eval

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "rome", ["none"] + list(editors.METHODS), "Method.")
flags.DEFINE_enum("dataset", "qaedit", ["qaedit", "zsre", "counterfact"],
                  "Dataset schema.")
flags.DEFINE_string("data_path", None, "Data file (default: the bundled one).")
flags.DEFINE_integer("start", 0, "First record.")
flags.DEFINE_integer("num_edits", 100, "Cases.")
flags.DEFINE_enum("mode", "single", ["single", "sequential"], "Protocol.")
flags.DEFINE_integer("batch_size", 1, "Sequential: edits per turn.")
flags.DEFINE_list("forms", list(wild_eval.CONTEXTS), "Context forms.")
flags.DEFINE_integer("max_new_tokens", 32, "Generation budget.")
flags.DEFINE_string("output", None, "JSON to write.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py",
                                "Editor hyper-parameters.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS
TF = ("token", "survey")


def measure(model, params, cases, ref_tf, ref_wild, unedited=False):
  tf_rows, _ = evaluator.evaluate(model, params, cases, ref_tf, families=TF)
  wild_rows, _ = wild_eval.evaluate(model, params, cases, ref_wild,
                                    forms=FLAGS.forms,
                                    max_new_tokens=FLAGS.max_new_tokens,
                                    unedited=unedited)
  return [dict(t, **w) for t, w in zip(tf_rows, wild_rows)]


def summarize(rows):
  keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
  return {k: 100.0 * sum(r[k] for r in rows if k in r) /
          sum(1 for r in rows if k in r) for k in keys}


def main(argv):
  del argv
  common.setup()
  cases = cases_lib.load_cases(FLAGS.dataset, FLAGS.data_path,
                               limit=FLAGS.num_edits, start=FLAGS.start)
  ids = [str(c.case_id) for c in cases]
  unique_ids = len(set(ids)) == len(ids)
  if not unique_ids:  # QAEdit repeats ids across its sources
    cases = [dataclasses.replace(c, case_id=f"{c.case_id}@{i}")
             for i, c in enumerate(cases)]
  for form in FLAGS.forms:
    if form not in wild_eval.CONTEXTS:
      raise app.UsageError(f"--forms: {form!r} is not one of "
                           f"{wild_eval.CONTEXTS}")
  editor = (None if FLAGS.method == "none" else editors.get(
      FLAGS.method, editor_configs.hparams_from(FLAGS.config, FLAGS.method)))
  model = models.load(FLAGS.model)
  params0 = model.params
  t0 = time.perf_counter()
  ref_tf = evaluator.reference(model, params0, cases)
  ref_wild = wild_eval.reference(model, params0, cases, FLAGS.forms,
                                 FLAGS.max_new_tokens)
  edit_seconds = 0.0
  if editor is None:
    rows = measure(model, params0, cases, ref_tf, ref_wild, unedited=True)
  else:
    state = editor.init(model)
    if FLAGS.mode == "single":
      rows = []
      for case in progress_lib.bar(cases, desc=f"{editor.name} single"):
        t = time.perf_counter()
        params, _, _ = editor.apply(model, params0, case.requests, state)
        edit_seconds += time.perf_counter() - t
        rows += measure(model, params, [case], ref_tf, ref_wild)
    else:
      params = params0
      groups = [cases[i:i + FLAGS.batch_size]
                for i in range(0, len(cases), FLAGS.batch_size)]
      for group in progress_lib.bar(groups, desc=f"{editor.name} sequential"):
        t = time.perf_counter()
        params, state, _ = editor.apply(
            model, params, [q for c in group for q in c.requests], state)
        edit_seconds += time.perf_counter() - t
      rows = measure(model, params, cases, ref_tf, ref_wild)
  out = {"command": {k: FLAGS[k].value for k in (
      "model", "method", "dataset", "data_path", "start", "num_edits", "mode",
      "batch_size", "forms", "max_new_tokens")},
         "method": FLAGS.method, "n": len(cases),
         "case_ids": ("as in the file" if unique_ids else
                      "id@position (the file repeats ids)"),
         "metrics": summarize(rows),
         "timing": {"edit_seconds": edit_seconds,
                    "total_seconds": time.perf_counter() - t0},
         "cases": rows}
  if editor is not None:
    out["hparams"] = dataclasses.asdict(editor.hparams)
  with open(FLAGS.output, "w") as f:
    json.dump(out, f, indent=1, default=str)
  m = out["metrics"]
  print(f"teacher-forced: rewrite_acc {m.get('rewrite_acc', 0):.1f}  "
        f"SR {m.get('sr', 0):.1f}  rephrase_acc {m.get('rephrase_acc', 0):.1f}"
        f"  locality_acc {m.get('locality_acc', 0):.1f}")
  for form in FLAGS.forms:
    print(f"wild[{form}]: reliability exact "
          f"{m.get(form + '/reliability_exact', 0):.1f} contains "
          f"{m.get(form + '/reliability_contains', 0):.1f}; generality exact "
          f"{m.get(form + '/generality_exact', 0):.1f} contains "
          f"{m.get(form + '/generality_contains', 0):.1f}; locality "
          f"{m.get(form + '/locality', 0):.1f}")
  print("wrote", FLAGS.output)


if __name__ == "__main__":
  app.run(main)
