r"""What an edit manifest costs on the default model: its size and `verify`.

  python -m experiments.bench_manifest --method=ultraedit --num_facts=32 \
      --batch=8 --output_json=docs/benchmarks/manifest_ultraedit_cf32.json

Streams `--num_facts` CounterFact edits in batches of `--batch` into a
`LiveModel` that keeps a manifest, saves it, and verifies it against the
base. Reports the declared deltas' bytes (deltas.safetensors) against the
dense changes they stand for (every changed leaf, float32, per operation),
the seconds the editor spent writing its records, and verify's verdict.
"""

import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models
from keditjax.editors import base
from keditjax.evaluation import cases as cases_lib
from keditjax.stream import live as live_lib, verify

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "ultraedit", list(editors.METHODS), "Editing method.")
flags.DEFINE_integer("num_facts", 32, "CounterFact edits.")
flags.DEFINE_integer("batch", 8, "Edits per operation.")
flags.DEFINE_string("output_json", "runs/bench_manifest.json", "Results JSON.")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup()
  model = models.load(FLAGS.model)
  cases = cases_lib.load_cases("counterfact", limit=FLAGS.num_facts)
  editor = editors.get(FLAGS.method, editor_configs.hparams_from(FLAGS.config, FLAGS.method))
  dense, records_s = [0], []

  def count(kind, snapshot, info):
    del snapshot
    if kind == "apply":
      dense[0] += sum(4 * base.get_leaf(info["before"], tuple(p.split("/"))).size
                      for p in info["info"].changed)
      records_s.append(info["info"].seconds.get("records", 0.0))

  live = live_lib.LiveModel(model, editor, on_change=count)
  for start in range(0, len(cases), FLAGS.batch):
    live.edit([c.request for c in cases[start:start + FLAGS.batch]])
  with tempfile.TemporaryDirectory() as tmp:
    out_dir = live.save(os.path.join(tmp, "edited"))
    size = os.path.getsize(os.path.join(out_dir, "deltas.safetensors"))
    start = time.perf_counter()
    report = verify.verify(model, out_dir)
    verify_s = time.perf_counter() - start
  out = {"command": f"python -m experiments.bench_manifest --method={FLAGS.method} "
                    f"--num_facts={FLAGS.num_facts} --batch={FLAGS.batch}",
         "model": FLAGS.model, "operations": len(live.manifest.operations),
         "deltas_bytes": size, "dense_bytes": dense[0], "ratio": dense[0] / size,
         "records_seconds": records_s, "verify_ok": report.ok, "verify_seconds": verify_s,
         "verify_summary": report.summary()}
  print(json.dumps({k: v for k, v in out.items() if k != "verify_summary"}, indent=1))
  with open(FLAGS.output_json, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", FLAGS.output_json)


if __name__ == "__main__":
  app.run(main)
