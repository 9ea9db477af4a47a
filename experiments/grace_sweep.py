"""GRACE's layer and deferral radius, chosen on the CounterFact training split.

GRACE's behaviour outside its value training is set by where queries fall:
an edit's own prompt must hit its key (it does, the key *is* that query), an
unrelated prompt must not hit any key (neighbourhood), and a paraphrase hits
only if it lands within ε (generalisation). This sweep measures, per layer,
the distances from each edit key to the queries of its paraphrases, of its
neighbourhood prompts, and of the other edits' prompts, relative to the key's
norm, and reports for each `eps_factor` the paraphrase hit rate and the
false-hit rates. No value training is needed, so it runs in a minute.

  python -m experiments.grace_sweep --num_records=100 --output=docs/results/grace_sweep.json
"""

import json

import numpy as np
from absl import app, flags

from experiments import common
from keditjax import models
from keditjax.evaluation import cases as cases_lib
from keditjax.models import sites as sites_lib

flags.DEFINE_integer("num_records", 100, "Training records to use.")
flags.DEFINE_string("layers", "12,18,21,24,27", "Layers to measure.")
flags.DEFINE_string("eps_factors", "0.02,0.05,0.1,0.2,0.3,0.5",
                    "Radii relative to the key norm.")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS


def last_token_keys(model, texts, layers, batch=32):
  """`layer/{l}/mlp/key` at each text's last token: {l: [N, F]}."""
  names = [f"layer/{l}/mlp/key" for l in layers]
  out = {l: [] for l in layers}
  for start in range(0, len(texts), batch):
    ids = [model.encode(t) for t in texts[start:start + batch]]
    length = max(16, -(-max(map(len, ids)) // 16) * 16)
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    last = np.zeros((batch, 1), np.int32)
    for row, i in enumerate(ids):
      tokens[row, :len(i)] = i
      mask[row, :len(i)] = 1
      last[row, 0] = len(i) - 1
    _, got = model.apply(model.params, tokens, attention_mask=mask,
                         sites=sites_lib.capture(*names, positions=last))
    for l, name in zip(layers, names):
      out[l].append(np.asarray(got[name])[:len(ids), 0])
  return {l: np.concatenate(v).astype(np.float64) for l, v in out.items()}


def main(argv):
  del argv
  common.setup()
  model = models.load()
  cases = cases_lib.load_cases("counterfact", "counterfact-train",
                               limit=FLAGS.num_records)
  layers = [int(x) for x in FLAGS.layers.split(",")]
  factors = [float(x) for x in FLAGS.eps_factors.split(",")]
  edit_texts = [c.prompt for c in cases]
  para = [(i, p) for i, c in enumerate(cases) for p in c.paraphrase_prompts]
  neigh = [(i, p) for i, c in enumerate(cases) for p, _ in c.neighborhood]
  keys = last_token_keys(model, edit_texts, layers)
  para_q = last_token_keys(model, [p for _, p in para], layers)
  neigh_q = last_token_keys(model, [p for _, p in neigh], layers)
  report = {"num_records": len(cases), "layers": {}}
  for l in layers:
    k = keys[l]
    norms = np.linalg.norm(k, axis=1)
    # Relative distance of each query to each edit key: d / ||k_i||.
    rel = lambda q: np.linalg.norm(q[:, None] - k[None], axis=2) / norms[None]
    d_para, d_neigh, d_edit = rel(para_q[l]), rel(neigh_q[l]), rel(k)
    np.fill_diagonal(d_edit, np.inf)
    own_para = d_para[np.arange(len(para)), [i for i, _ in para]]
    rows = {}
    for f in factors:
      rows[str(f)] = {
          "paraphrase_hits_own_key": float(np.mean(own_para <= f)),
          "neighbourhood_hits_any_key": float(np.mean(
              (d_neigh <= f).any(axis=1))),
          "edit_prompt_hits_other_key": float(np.mean(
              (d_edit <= f).any(axis=1))),
      }
    report["layers"][str(l)] = {
        "key_norm_median": float(np.median(norms)),
        "paraphrase_rel_dist_median": float(np.median(own_para)),
        "neighbourhood_rel_dist_min_median": float(np.median(
            d_neigh.min(axis=1))),
        "neighbourhood_rel_dist_min_p1": float(np.percentile(
            d_neigh.min(axis=1), 1)),
        "by_eps_factor": rows}
  text = json.dumps(report, indent=1)
  print(text)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
