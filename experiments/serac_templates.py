r"""How SERAC's counterfactual model sees an in-scope input: template choice.

The counterfactual model is the base model prompted with the retrieved edit
(`SeracHParams.template`). For each template this scores, on CounterFact
*training* records (the edit split is never used to choose), with routing
assumed right:

  prompt      % of edit prompts where P(new target) > P(old target)
  para        the same on each record's first paraphrase
  neigh_wrong % of neighbourhood prompts that still prefer their true answer
              over the edit's target when wrongly routed to the edit (what
              a routing error costs)

  python -m experiments.serac_templates --output=docs/results/serac_templates.json
"""

import json
import time

import numpy as np
from absl import app, flags

from keditjax import data, models
from keditjax.evaluation import cases as cases_lib
from keditjax.training import scope

TEMPLATES = {
    "A": "{edit}. {prompt}",
    "B": "{edit}.\n{prompt}",
    "C": "Fact: {edit}.\n{prompt}",
    "D": "Imagine that {edit}. {prompt}",
    "E": "Imagine that {edit}. Imagine that {edit}. {prompt}",
    "F": "{edit}. {edit}. {edit}. {prompt}",
    "G": "Imagine that {edit}. In this world, {prompt}",
    "H": "{edit}. {edit}. Imagine that {edit}. {prompt}",
}

flags.DEFINE_integer("num_records", 100, "Training records scored.")
flags.DEFINE_list("templates", sorted(TEMPLATES), "Template names.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  model = models.load("smollm2-135m")
  path = cases_lib.default_path("counterfact-train")
  # From the training split's last 200 records: the scope classifier's
  # validation records, which it never trained on.
  records = data.read_records(path)[-200:-200 + FLAGS.num_records]
  cases = []
  for r in records:
    try:
      cases += cases_lib.parse_cases([r], "counterfact", where=path)
    except Exception:  # pylint: disable=broad-except
      continue  # malformed training records are skipped
  out = {"command": {"num_records": FLAGS.num_records,
                     "templates": FLAGS.templates},
         "cases": len(cases), "templates": {}}
  start = time.perf_counter()
  for name in FLAGS.templates:
    template = TEMPLATES[name]
    res = {"template": template}
    for kind in ("prompt", "para", "neigh_wrong"):
      prompts, new, old = [], [], []
      for c in cases:
        q = c.requests[0]
        if kind == "prompt":
          p, a, b = q.text, q.target_new, q.target_true
        elif kind == "para":
          p, a, b = c.paraphrase_prompts[0], q.target_new, q.target_true
        else:  # wrongly routed: does the neighbour keep its true answer?
          p, a, b = (c.neighborhood[0][0],
                     " " + c.neighborhood[0][1].strip(), q.target_new)
        prompts.append(template.format(edit=scope.statement(q), prompt=p))
        new.append(a)
        old.append(b)
      s1 = model.score(model.params, prompts, new, reduction="mean",
                       batch_size=32)
      s0 = model.score(model.params, prompts, old, reduction="mean",
                       batch_size=32)
      res[kind] = float(np.mean(np.asarray(s1) > np.asarray(s0)) * 100)
    out["templates"][name] = res
    print(name, res, flush=True)
  out["seconds"] = time.perf_counter() - start
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
