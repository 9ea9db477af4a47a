r"""The main job: load the default model, show what it knows.

  python -m experiments.demo [--model=smollm2-135m] [--top_k=5]
      [--prompts="The capital of France is" --prompts=...]
      [--max_new_tokens=20] [--output_json=PATH]

Prints the top next-token predictions for a few factual prompts and a short
greedy generation. (Once the ROME issue lands, `experiments.edit` becomes the
main job: the same view before and after a fact edit.)
"""

import json
import os
import time

from absl import app, flags, logging
import jax
import numpy as np

from keditjax import models

_MODEL = flags.DEFINE_string("model", models.DEFAULT_MODEL, "Model to load.")
_PROMPTS = flags.DEFINE_multi_string(
    "prompts", ["The capital of France is",
                "The mother tongue of Danielle Darrieux is",
                "Michael Jordan plays the sport of",
                "The Eiffel Tower is located in the city of"],
    "Factual prompts to complete.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Predictions shown per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "Generation length.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Write the results here.")


def top_predictions(model, params, prompt, k):
  """[(token text, probability)] of the k most likely next tokens."""
  logits = model.apply(params, np.array([model.encode(prompt)]))
  probs = np.asarray(jax.nn.softmax(logits[0, -1]))
  best = np.argsort(-probs)[:k]
  return [(model.tokenizer.decode([i]), float(probs[i])) for i in best]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep the output to results
  start = time.perf_counter()
  model = models.load(_MODEL.value)
  print(f"Loaded {model!r} in {time.perf_counter() - start:.1f}s "
        f"on {jax.devices()[0].platform}.\n")
  results = []
  for prompt in _PROMPTS.value:
    top = top_predictions(model, model.params, prompt, _TOP_K.value)
    generation = model.generate(model.params, prompt, _MAX_NEW.value)
    shown = ", ".join(f"{t!r} {p:.2f}" for t, p in top)
    print(f"{prompt!r}\n  next token: {shown}\n  greedy: {prompt}{generation}\n")
    results.append({"prompt": prompt, "top": top, "generation": generation})
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump({"model": _MODEL.value, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
