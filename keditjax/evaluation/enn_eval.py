"""Editable training (ENN) against fine-tuning on the vision flips.

  results = enn_eval.compare(enn_cnn_mnist.get_config())

Meta-trains the CNN with `enn_training.build` (cached under the
vision cache, keyed by the objective's fingerprint and the trainer config),
then runs `vision.run_vision` on the same cases for

  ft/ordinary   FT (`vision.DEFAULT_HPARAMS["ft"]`) on the ordinary CNN,
  enn/ordinary  the ENN editor on the ordinary CNN (no editable training),
  ft/enn        FT on the meta-trained CNN,
  enn/enn       the ENN editor on the meta-trained CNN (the method),

in single mode (`num_single` flips) and sequential mode (the first
`num_successive` of them), and reports the test accuracy of both CNNs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from keditjax import editors, errors, training
from keditjax.editors import enn
from keditjax.evaluation import enn_training, vision

# Trainer fields that do not change the trained weights.
_NOT_IN_KEY = ("progress", "tensorboard", "log_every", "checkpoint_every",
               "keep", "resume")
PAIRS = (("ft", "ordinary"), ("enn", "ordinary"), ("ft", "enn"),
         ("enn", "enn"))


def meta_train(config, workdir: str | None = None):
  """Meta-trains the CNN; returns (params, history, best_step, seconds)."""
  objective, batch_fn, valid = enn_training.build(config)
  start = time.perf_counter()
  result = training.train(objective, config.train, batch_fn=batch_fn,
                          valid_batches=valid, workdir=workdir)
  return (result.params, result.history, result.best_step,
          time.perf_counter() - start)


def load_or_meta_train(config, workdir: str | None = None):
  """`meta_train`, cached as msgpack next to the ordinary CNN.

  Returns:
    (classifier, info): the meta-trained `Classifier` and {cache_path,
    from_cache, train_seconds, best_step, history}.
  """
  from keditjax.models import cnn
  objective, _, _ = enn_training.build(config)
  train = {k: v for k, v in config.train.to_dict().items()
           if k not in _NOT_IN_KEY}
  key = hashlib.sha256(json.dumps(
      {"objective": objective.fingerprint, "train": train},
      sort_keys=True, default=str).encode()).hexdigest()[:16]
  _, base_classifier, _ = enn_training.load_base(config)
  root = config.get("cache_dir") or cnn.default_cache_dir()
  path = os.path.join(root, f"enn-{key}.msgpack")
  if os.path.exists(path):
    params = cnn.load_params(path, base_classifier.config)
    meta = {}
    if os.path.exists(path + ".json"):
      with open(path + ".json") as f:
        meta = json.load(f)
    info = {"cache_path": path, "from_cache": True, **meta}
  else:
    params, history, best, seconds = meta_train(config, workdir)
    cnn.save_params(path, params)
    meta = {"train_seconds": seconds, "best_step": best, "history": history}
    with open(path + ".json", "w") as f:
      json.dump(meta, f)
    info = {"cache_path": path, "from_cache": False, **meta}
  return cnn.Classifier(base_classifier.config, params, name="enn-cnn"), info


def enn_hparams(config) -> enn.ENNHParams:
  """The editor the config meta-trains for."""
  return enn.ENNHParams(
      params_regex=config.params_regex, inner_steps=config.inner_steps,
      lr=config.inner_lr, optimizer=config.inner_optimizer,
      margin=config.margin, max_steps=config.max_steps)


def compare(config, *, num_single: int = 50, num_successive: int = 20,
            workdir: str | None = None, progress: bool = False) -> dict:
  """FT vs ENN on the same flips (see the module docstring).

  Returns:
    {"classifiers": {ordinary, enn: {test_accuracy, ...}}, "single":
    {"<editor>/<model>": metrics}, "successive": {...}, "meta_training"}.
  """
  if not 1 <= num_successive <= num_single:
    raise errors.ConfigError(f"num_successive={num_successive} must be in "
                             f"[1, num_single={num_single}].")
  setup = vision.prepare(
      config.dataset, num_edits=num_single, seed=config.seed,
      train_steps=config.base.train_steps,
      train_batch_size=config.base.batch_size, train_lr=config.base.lr,
      label_smoothing=config.base.label_smoothing, progress=progress)
  data = setup.data
  meta_classifier, meta_info = load_or_meta_train(config, workdir)
  models = {"ordinary": setup.classifier, "enn": meta_classifier}
  built = {"ft": vision.build_editors(["ft"], {})["ft"],
           "enn": editors.get("enn", enn_hparams(config))}
  accuracy = {name: 100.0 * float(np.mean(
      model.predict(model.params, data.test_images) == data.test_labels))
              for name, model in models.items()}
  out = {"classifiers": {name: {"test_accuracy": accuracy[name]}
                         for name in models},
         "meta_training": {k: v for k, v in meta_info.items()
                           if k != "history"},
         "history": meta_info.get("history", []),
         "hparams": {"ft": vision.DEFAULT_HPARAMS["ft"],
                     "enn": enn_hparams(config).__dict__},
         "single": {}, "successive": {}}
  for mode, key, cases in (("single", "single", setup.cases),
                           ("sequential", "successive",
                            setup.cases[:num_successive])):
    for method, model in PAIRS:
      result = vision.run_vision(
          models[model], built[method], cases, mode=mode,
          test_images=data.test_images, test_labels=data.test_labels,
          init_kwargs=setup.init_kwargs, progress=progress)
      metrics = dict(result["metrics"])
      metrics["edit_seconds_median"] = result["timing"].get(
          "edit_seconds_median")
      metrics["steps_mean"] = float(np.mean([c.get("steps", np.nan)
                                             for c in result["cases"]]))
      out[key][f"{method}/{model}"] = metrics
  return out


def summary_markdown(results: dict, num_single: int,
                     num_successive: int) -> str:
  """The comparison as a markdown table."""
  acc = results["classifiers"]
  lines = [f"Test accuracy: ordinary CNN {acc['ordinary']['test_accuracy']:.1f}"
           f"%, meta-trained (ENN) CNN {acc['enn']['test_accuracy']:.1f}%.", "",
           "| edits | editor / CNN | SR | GR | DD | RR | steps/edit |",
           "|---|---|---|---|---|---|---|"]
  for key, n in (("single", num_single), ("successive", num_successive)):
    for name, m in results[key].items():
      rr = "" if m.get("rr") is None else f"{m['rr']:.1f}"
      lines.append(f"| {n} {key} flips | {name} | {m['sr']:.1f} | "
                   f"{m['gr']:.1f} | {m['dd']:.2f} | {rr} | "
                   f"{m['steps_mean']:.1f} |")
  return "\n".join(lines) + "\n"
