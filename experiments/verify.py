r"""Check an edited checkpoint against its base model and its manifest.

  python -m experiments.verify --base=smollm2-135m --edited=/tmp/edited \
      --key_file=signing.key --output_json=/tmp/verify.json

The edited directory is one `keditjax.stream.manifest.save_edited` wrote.
Prints the report (`keditjax.stream.verify`): every tensor unchanged or
explained by the declared edits, or what is not, with its layer, norm and
rank. Exits 1 when the checkpoint does not verify, 2 on an error (no
manifest, another base model, ...: one line, no traceback).
"""

import json
import sys

from absl import app, flags

from experiments import common
from keditjax import errors, models
from keditjax.stream import manifest, verify

flags.DEFINE_string("base", models.DEFAULT_MODEL,
                    "The base model: a name keditjax.models.load accepts "
                    "(smollm2-135m, hf:<dir or hub id>, gguf:<path>).")
flags.DEFINE_string("edited", None, "The edited checkpoint's directory.")
flags.DEFINE_string("key_file", None, "Check the signature with this key: the "
                    "file's bytes (HMAC-SHA256) or a PEM Ed25519 key.")
flags.DEFINE_string("output_json", None, "Write the report here.")
FLAGS = flags.FLAGS


def check() -> verify.Report:
  """The report for the flags (keditjax errors before loading the base)."""
  if not FLAGS.edited:
    raise errors.InputError("--edited is required (the edited checkpoint).")
  key = manifest.read_key(FLAGS.key_file) if FLAGS.key_file else None
  manifest.read_files(FLAGS.edited)  # no manifest: fail before loading
  base = models.load(FLAGS.base)
  return verify.verify(base.params, FLAGS.edited, key=key)


def main(argv):
  del argv
  common.setup()
  try:
    report = check()
  except errors.KeditError as e:
    print(f"verify: {type(e).__name__}: " + " ".join(str(e).split()),
          file=sys.stderr)
    sys.exit(2)
  print(report.summary())
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  if not report.ok:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
