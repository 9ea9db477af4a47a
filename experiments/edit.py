r"""Edit one fact and show the model before and after.

  python -m experiments.edit --model=smollm2-135m --method=rome \
      --prompt="The mother tongue of {} is" --subject="Danielle Darrieux" \
      --target_new="English"

Prints the top next tokens, P(target_new), P(original answer) and a short
generation for the prompt, a paraphrase (generality) and an unrelated prompt
(locality), and the edit time. `--output_json` writes the numbers, `--save`
the edited model (Hugging Face format). Hyper-parameters: `--config.<method>.<field>=...`.
`--mesh=2x4` shards the model over a (data, model) device mesh and edits it there.
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from experiments import common
from experiments.configs import editors as editor_configs
from keditjax import editors, models, sharding

flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to edit.")
flags.DEFINE_enum("method", "rome", list(editors.METHODS), "Editing method.")
flags.DEFINE_string("prompt", "The mother tongue of {} is", "Prompt, {} = subject.")
flags.DEFINE_string("subject", "Danielle Darrieux", "The subject.")
flags.DEFINE_string("target_new", "English", "The new answer.")
flags.DEFINE_string("target_true", None, "The original answer (default: the model's greedy one).")
flags.DEFINE_string("paraphrase", "Where {} is from, people speak the language of", "A rephrasing ({} = subject).")
flags.DEFINE_string("unrelated", "The mother tongue of Michel Rocard is", "A prompt the edit should not change.")
flags.DEFINE_integer("max_new_tokens", 16, "Generation length.")
flags.DEFINE_string("output_json", None, "Write the numbers here.")
flags.DEFINE_string("save", None, "Save the edited model (HF format) in this directory.")
flags.DEFINE_string("mesh", None, "Shard the model over a DATAxMODEL device mesh, e.g. 2x4 "
                    "(keditjax.sharding rules; default: one device).")
config_flags.DEFINE_config_file("config", "experiments/configs/editors.py", "Editor hyper-parameters.")
FLAGS = flags.FLAGS


def report(model, params, prompts, new, true):
  """Top-5 next tokens, P(new), P(true) and a generation for each prompt."""
  out = {}
  logits = [model.apply(params, np.array([model.encode(p)]))[0, -1] for p in prompts.values()]
  p_new = np.exp(model.score(params, list(prompts.values()), [new] * len(prompts)))
  p_true = np.exp(model.score(params, list(prompts.values()), [true] * len(prompts)))
  gens = model.generate(params, list(prompts.values()), FLAGS.max_new_tokens)
  for i, (name, prompt) in enumerate(prompts.items()):
    probs = np.exp(logits[i] - np.max(logits[i]))
    probs /= probs.sum()
    top = [(model.tokenizer.decode([int(t)]), float(probs[t])) for t in np.argsort(-probs)[:5]]
    out[name] = dict(prompt=prompt, top=top, p_new=float(p_new[i]), p_true=float(p_true[i]),
                     generation=gens[i])
  return out


def show(title, results):
  print(f"\n== {title} ==")
  for name, r in results.items():
    top = ", ".join(f"{t!r} {p:.3f}" for t, p in r["top"])
    print(f"[{name}] {r['prompt']!r}\n  P(new)={r['p_new']:.4f}  P(true)={r['p_true']:.4f}\n"
          f"  top: {top}\n  -> {r['generation']!r}")


def main(argv):
  del argv
  common.setup()
  mesh = sharding.mesh_from_flag(FLAGS.mesh)  # a bad --mesh fails before loading
  model = models.load(FLAGS.model)
  if mesh is not None:
    model = sharding.shard_model(model, mesh)
  request = editors.make_request(dict(prompt=FLAGS.prompt, subject=FLAGS.subject,
                                      target_new=FLAGS.target_new, target_true=FLAGS.target_true))
  prompts = {"prompt": request.text, "unrelated": FLAGS.unrelated}
  if FLAGS.paraphrase:
    prompts = {"prompt": request.text, "paraphrase": FLAGS.paraphrase.format(request.subject),
               "unrelated": FLAGS.unrelated}
  true = request.target_true or model.generate(model.params, request.text, 1)
  hparams = editor_configs.hparams_from(FLAGS.config, FLAGS.method)
  editor = editors.get(FLAGS.method, hparams)
  before = report(model, model.params, prompts, request.target_new, true)
  show(f"before ({model.name})", before)
  state = editor.init(model)
  start = time.perf_counter()
  params, _, info = editor.apply(model, model.params, request, state)
  seconds = time.perf_counter() - start
  after = report(model, params, prompts, request.target_new, true)
  show(f"after {FLAGS.method} ({seconds:.2f} s)", after)
  print(f"\nP({request.target_new.strip()!r}): {before['prompt']['p_new']:.4f} -> "
        f"{after['prompt']['p_new']:.4f}   P({true.strip()!r}): {before['prompt']['p_true']:.4f}"
        f" -> {after['prompt']['p_true']:.4f}   edit {seconds:.2f} s {info.seconds}")
  if FLAGS.output_json:
    result = dict(
        method=FLAGS.method, model=model.name, request=request.__dict__, target_true=true,
        p_new_before=before["prompt"]["p_new"], p_new_after=after["prompt"]["p_new"],
        p_true_before=before["prompt"]["p_true"], p_true_after=after["prompt"]["p_true"],
        edit_seconds=seconds, phase_seconds=info.seconds,
        generations={k: {"before": before[k]["generation"], "after": after[k]["generation"]}
                     for k in prompts},
        before=before, after=after, info=info.to_json())
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=1)
  if FLAGS.save:
    print("saved to", models.save(model, FLAGS.save, params))


if __name__ == "__main__":
  app.run(main)
