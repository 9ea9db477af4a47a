r"""MQuAKE multi-hop accuracy after editing all of a case's facts.

  python -m experiments.mquake --methods=none,rome,memit,alphaedit,grace \
      --num_cases=100 --output=docs/results/mquake.json

For each case (bundled: a 354-case MQuAKE-CF subset; --data_path for
MQuAKE-CF-3k-v2 or `hf:`), every requested rewrite of the case is edited
into the unedited model in one `apply`, and the case counts as answered when
*any* of its three multi-hop questions is answered with the new answer (or an
alias), as in the MQuAKE paper (Zhong et al. 2023). Two judgements:

  - teacher-forced: greedy decoding of the answer given the question yields
    every token of the new answer (any alias);
  - WILD: the greedy generation (`--max_new_tokens`) contains the answer or
    an alias as whole words (`wild.contains`), and its first clause equals
    one (`wild.exact`).

`--form` puts each question in a context (`wild_eval.context`: the bare
question, a QA instruction or the chat template) for both judgements; this
instruct model often ends its turn at once when asked a bare question.

`none` is the unedited model, judged against the *original* answers (the
paper's "before" column) and the new ones.
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import data, editors, models
from keditjax import progress as progress_lib
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import metrics as M
from keditjax.evaluation import scoring, wild, wild_eval

# The MQuAKE paper's multi-hop accuracy on MQuAKE-CF, GPT-J (Table 3).
PAPER_GPTJ = {"before": 40.5, "ft": 1.5, "mend": 8.0, "rome": 7.4,
              "memit": 7.0}

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_list("methods", ["none", "rome", "memit", "alphaedit", "grace"],
                  "Methods (none: the unedited model).")
flags.DEFINE_string("data_path", None, "MQuAKE file (default: the bundled subset).")
flags.DEFINE_integer("num_cases", 100, "Cases (from the first).")
flags.DEFINE_integer("max_new_tokens", 24, "Generation budget.")
flags.DEFINE_enum("form", "question", list(wild_eval.CONTEXTS),
                  "Context of each question (both judgements).")
flags.DEFINE_string("output", None, "JSON to write.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py",
                                "Editor hyper-parameters.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def judge_case(model, params, questions, answers):
  """`{"tf", "wild_exact", "wild_contains"}`: any question answered."""
  questions = [wild_eval.context(model, q, FLAGS.form) for q in questions]
  pairs = [(q, a) for a in answers for q in questions]
  scored = scoring.teacher_forced(model, params, [q for q, _ in pairs],
                                  [a for _, a in pairs])
  tf = any(M.exact_match(s.correct) for s in scored)
  gens = wild_eval.answers(model, params, questions, FLAGS.max_new_tokens)
  return {"tf": tf,
          "wild_exact": any(wild.exact(g, answers) for g in gens),
          "wild_contains": any(wild.contains(g, answers) for g in gens),
          "answers": [wild.cut(g) for g in gens]}


def main(argv):
  del argv
  common.setup()
  path = FLAGS.data_path or cases_lib.default_path("mquake")
  cases = cases_lib.load_cases("mquake", path, limit=FLAGS.num_cases)
  records = data.read_records(path)[:FLAGS.num_cases]
  model = models.load(FLAGS.model)
  out = {"command": {k: FLAGS[k].value for k in (
      "model", "methods", "data_path", "num_cases", "max_new_tokens",
      "form")},
         "paper_gptj": PAPER_GPTJ, "rows": []}
  for method in FLAGS.methods:
    editor = None if method == "none" else editors.get(
        method, editor_configs.hparams_from(FLAGS.config, method))
    state = editor.init(model) if editor else None
    t0, edit_seconds, per_case = time.perf_counter(), 0.0, []
    for case, rec in progress_lib.bar(list(zip(cases, records)),
                                      desc=f"mquake {method}"):
      questions = [q for q, _, _ in case.portability]
      new = [rec["new_answer"]] + list(rec.get("new_answer_alias") or [])
      params = model.params
      if editor is not None:
        t = time.perf_counter()
        params, _, _ = editor.apply(model, params, case.requests, state)
        edit_seconds += time.perf_counter() - t
      row = {"case_id": case.case_id, "edits": len(case.requests),
             "new": judge_case(model, params, questions, new)}
      if editor is None:
        old = [rec["answer"]] + list(rec.get("answer_alias") or [])
        row["old"] = judge_case(model, params, questions, old)
      per_case.append(row)
    summary = {"method": method, "n": len(per_case),
               "edit_seconds": edit_seconds,
               "total_seconds": time.perf_counter() - t0}
    for which in ("new", "old"):
      got = [r[which] for r in per_case if which in r]
      if got:
        for k in ("tf", "wild_exact", "wild_contains"):
          summary[f"{which}_{k}"] = 100.0 * sum(g[k] for g in got) / len(got)
    print({k: round(v, 1) if isinstance(v, float) else v
           for k, v in summary.items()}, flush=True)
    out["rows"].append(dict(summary, cases=per_case))
    with open(FLAGS.output, "w") as f:
      json.dump(out, f, indent=1, default=str)
  print("wrote", FLAGS.output)


if __name__ == "__main__":
  app.run(main)
