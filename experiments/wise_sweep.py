"""WISE's hyper-parameters, chosen on the CounterFact training split.

For each setting (`--settings`, one `field=value,...` string each) this edits
`--num_records` training records in sequence, then scores every case
(efficacy, paraphrase, neighbourhood: the harness's CounterFact metrics) and
measures the router itself: at the last prompt token of each edit prompt,
paraphrase, neighbourhood prompt and of held-out WikiText-2 text, how often
a shard fires, and the distances relative to the threshold; and the scores
with every shard forced to fire (content without routing). Records from
`--start` on are past those whose subjects and locality prompts `init`
uses as negatives. The unedited model's scores come first.

  python -m experiments.wise_sweep --num_records=20 \
      --settings="seed=0" --settings="save_freq=500,hard_negatives=0" \
      --output=docs/results/wise_sweep.json
"""

import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from keditjax import editors, models
from keditjax.editors import wise
from keditjax.evaluation import cases as cases_lib
from keditjax.evaluation import evaluator
from keditjax.models import layers as layers_lib

flags.DEFINE_integer("num_records", 30, "Training records to edit in sequence.")
flags.DEFINE_integer("start", 2000, "First training record to edit: past the "
                     "records whose locality prompts and subjects `init` "
                     "uses as negatives (wise.SUBJECT_POOL, "
                     "locality_prompts).")
flags.DEFINE_multi_string("settings", ["layer=24"], "WISE overrides, "
                          "'field=value,...' (values as Python literals).")
flags.DEFINE_string("output", None, "JSON output path.")
FLAGS = flags.FLAGS


def parse(setting: str) -> dict:
  out = {}
  for item in filter(None, setting.split(",")):
    name, value = item.split("=", 1)
    try:
      out[name] = eval(value, {})  # literals: 24, 0.1, True, "token"
    except (NameError, SyntaxError):
      out[name] = value
  return out


def last_token_routing(model, params, hparams, texts):
  """Per text: (max over shards of d − threshold at the last token, fires)."""
  _, adapter = wise.side_memory(params, hparams)
  main = wise._put(params, hparams, None)  # pylint: disable=protected-access
  rows = [model.encode(t) for t in texts]
  length = max(16, -(-max(map(len, rows)) // 16) * 16)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, ids in enumerate(rows):
    tokens[r, :len(ids)] = ids
    mask[r, :len(ids)] = 1
  _, key, value = wise._layer_inputs(  # pylint: disable=protected-access
      model.config, main, jnp.asarray(tokens), jnp.asarray(mask),
      layer=hparams.layer)
  _, d = wise.shard_distances(adapter.params["deltas"], value, key,
                              model.config.activation)
  if hparams.router == "running_mean":
    d = wise.running_mean(d)
  last = np.asarray([len(ids) - 1 for ids in rows])
  d_SxN = np.asarray(d)[:, np.arange(len(rows)), last]
  live = np.asarray(adapter.params["active"]) > 0
  margin = d_SxN - np.asarray(adapter.params["threshold"])[:, None]
  margin = np.where(live[:, None], margin, -np.inf).max(0)
  return margin, margin > 0


def run_setting(model, cases, overrides, heldout_texts):
  editor = editors.get("wise", **overrides)
  state = editor.init(model)
  params, seconds, steps = model.params, [], []
  for case in cases:
    start = time.perf_counter()
    params, state, info = editor.apply(model, params, case.requests, state)
    seconds.append(time.perf_counter() - start)
    steps += info.extras["steps"]
  _, summary = evaluator.evaluate(model, params, cases,
                                  families=("counterfact",))
  # Content apart from routing: the same side memory with every live shard
  # forced to fire (the best live shard by distance still gives the output).
  _, adapter = wise.side_memory(params, editor.hparams)
  forced = wise._put(  # pylint: disable=protected-access
      params, editor.hparams, dataclasses.replace(adapter, params=dict(
          adapter.params, threshold=jnp.where(adapter.params["active"] > 0,
                                              -1e9, jnp.inf))))
  _, forced_summary = evaluator.evaluate(model, forced, cases,
                                         families=("counterfact",))
  routing = {}
  groups = {
      "edit": [r.text for c in cases for r in c.requests],
      "paraphrase": [p for c in cases for p in c.paraphrase_prompts],
      "neighborhood": [p for c in cases for p, _ in c.neighborhood],
      "wikitext": heldout_texts}
  for name, texts in groups.items():
    margin, fires = last_token_routing(model, params, editor.hparams, texts)
    routing[name] = {"fires": float(np.mean(fires)),
                     "margin_median": float(np.median(margin))}
  return {"overrides": overrides,
          "hparams": dataclasses.asdict(editor.hparams),
          "scale": float(state.scale),
          "threshold": info.extras["threshold"][-1],
          "metrics": {k: summary[k] for k in (
              "efficacy_score", "paraphrase_score", "neighborhood_score")},
          "metrics_all_shards_fire": {k: forced_summary[k] for k in (
              "efficacy_score", "paraphrase_score", "neighborhood_score")},
          "thresholds": [float(t) for t, a in zip(
              np.asarray(adapter.params["threshold"]),
              np.asarray(adapter.params["active"])) if a > 0],
          "routing": routing, "edit_seconds_median": float(np.median(seconds)),
          "steps_median": float(np.median(steps))}


def heldout_wikitext(model, count=64, skip=200):
  """WikiText-2 paragraphs after the ones `init` uses, cut at ~24 tokens."""
  from keditjax import stats
  out = []
  for i, text in enumerate(stats.resolve_corpus(stats.DEFAULT_CORPUS).texts()):
    if i < skip:
      continue
    ids = model.encode(text)
    if len(ids) >= 24:
      out.append(model.tokenizer.decode(ids[:24]))
    if len(out) == count:
      break
  return out


def main(argv):
  del argv
  common.setup()
  model = models.load()
  cases = cases_lib.load_cases("counterfact", "counterfact-train",
                               limit=FLAGS.num_records, start=FLAGS.start)
  texts = heldout_wikitext(model)
  _, summary = evaluator.evaluate(model, model.params, cases,
                                  families=("counterfact",))
  unedited = {k: summary[k] for k in (
      "efficacy_score", "paraphrase_score", "neighborhood_score")}
  print(json.dumps({"unedited": unedited}), flush=True)
  results = []
  for setting in FLAGS.settings:
    row = run_setting(model, cases, parse(setting), texts)
    print(json.dumps({k: row[k] for k in ("overrides", "metrics",
                                          "metrics_all_shards_fire", "routing",
                                          "edit_seconds_median",
                                          "steps_median", "threshold")}),
          flush=True)
    results.append(row)
    if FLAGS.output:  # after every setting: a long sweep keeps what it has
      with open(FLAGS.output, "w") as f:
        json.dump({"num_records": FLAGS.num_records, "start": FLAGS.start,
                   "split": "counterfact-train",
                   "unedited": unedited, "results": results}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
