"""Vision editing (the survey's first experiment): edit cases and protocol.

  data = vision_data.load_dataset("mnist")
  classifier, _ = cnn.load_or_train(data.train_images, data.train_labels)
  cases = make_cases(classifier, data.test_images, data.test_labels,
                     kind="flip", num_edits=20)
  results = run_vision(classifier, editors.get("ftl"), cases,
                       mode="sequential", test_images=data.test_images,
                       test_labels=data.test_labels)

Edit cases (`ImageEdit`, `make_cases`: "flip" and "correct") and the
neighbourhoods live in `vision_data` and are re-exported here.

Metrics (percentages; DD in points; see docs/metrics.md, "Vision editing"):

  SR  % of edited images predicted as their new label after the edit.
  GR  % of the edited images' neighbours (`vision_data.neighbourhood`: four
      1-pixel shifts, two noise draws, two brightness scales) predicted as
      the new label.
  DD  accuracy on the test split *excluding the edited images* before the
      edits minus after (positive = accuracy lost).
  RR  sequential mode: among earlier edits that held right after they were
      made, the % that still hold. None in single mode (nothing is earlier).

Modes: `single` edits every case into the original params (the editor state
from `init` is reused) and measures each on its own edited model; metrics
are means over cases. `sequential` carries params and state forward; SR, GR,
DD and RR are measured on the final model, and every `eval_every` steps a
record (`edits`, `sr_at_edit`, `sr`, `rr`, `dd`, `test_accuracy`) is kept.
The runner only calls `editor.init` and `editor.apply`; `build_editors`
makes the editors from method names and `key=value` overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from keditjax import editors as editors_lib
from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.evaluation import metrics as M
from keditjax.evaluation.vision_data import (KINDS, NEIGHBOURS, ImageEdit,
                                             make_cases, neighbourhood,
                                             validate_edit)

MODES = ("single", "sequential")
METHODS = ("ft", "ftl", "ftkl", "ewc")  # the fine-tuning family


def parse_hparams(text: str) -> dict:
  """`"steps=20,params_regex=dense1|head"` -> `{"steps": 20, "params_regex":
  "dense1|head"}`: values are Python literals where they parse, else strings.

  Raises:
    ConfigError: an item that is not `key=value`.
  """
  out = {}
  for item in filter(None, (text or "").split(",")):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not key:
      raise errors.ConfigError(f"hparams item {item!r} is not key=value.")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


# The vision defaults, chosen with `experiments.tradeoff --task=vision`
# (docs/RESULTS.md): plain SGD on dense1's kernel, stopping as soon as the
# edit holds. Adam's sign-like first steps move every weight by ~lr and cost
# 20-30 points of DD per single edit; the biases and the conv layers are
# shared by every image and edit far less locally than dense1's kernel.
COMMON_HPARAMS = {"params_regex": "dense1/kernel", "optimizer": "sgd",
                  "lr": 3e-3, "steps": 1000, "stop_loss": 0.8,
                  "stop_on": "argmax"}
DEFAULT_HPARAMS = {
    "ft": COMMON_HPARAMS,
    "ftl": {**COMMON_HPARAMS, "radius": 7e-3},
    "ftkl": {**COMMON_HPARAMS, "kl_weight": 100.0, "kl_examples": 64},
    "ewc": {**COMMON_HPARAMS, "ewc_lambda": 1e5, "fisher_examples": 2000,
            "fisher_batch": 64},
}


def default_strengths() -> dict:
  """method -> the default value of its swept strength (ringed in plots)."""
  from keditjax.evaluation import tradeoff
  return {m: DEFAULT_HPARAMS[m][p] for m, (p, _) in tradeoff.STRENGTH.items()}


def build_editors(methods: Sequence[str], overrides: dict,
                  defaults: bool = True) -> dict:
  """method -> `Editor`, each given the overrides that are its fields, on
  top of `DEFAULT_HPARAMS` (unless `defaults=False`: the dataclass
  defaults, tuned for language models).

  Raises:
    ConfigError: a method that is not registered, or an override that no
      method has as a field.
  """
  missing = [m for m in methods if m not in editors_lib.METHODS]
  if missing or not methods:
    raise errors.ConfigError(
        f"methods {list(methods)}: {missing or 'none given'} not available; "
        f"registered: {sorted(editors_lib.METHODS)}.")
  fields = {m: {f.name for f in dataclasses.fields(
      editors_lib.hparams_class(m))} for m in methods}
  unknown = sorted(set(overrides) - set().union(*fields.values()))
  if unknown:
    raise errors.UnsupportedConfigError(
        f"hparams {unknown} are not fields of any of {list(methods)}.")
  base = DEFAULT_HPARAMS if defaults else {}
  return {m: editors_lib.get(m, **{**base.get(m, {}), **{
      k: v for k, v in overrides.items() if k in fields[m]}})
          for m in methods}


@dataclasses.dataclass
class Setup:
  """Everything an experiment edits: data, classifier, cases, init data."""
  data: object
  classifier: object
  trained: dict
  test_accuracy: float
  cases: list
  init_kwargs: dict


def prepare(dataset: str = "mnist", *, num_edits: int, edits: str = "flip",
            flip_to: str = "runner_up", seed: int = 0, train_steps: int = 1500,
            train_batch_size: int = 64, train_lr: float = 1e-3,
            label_smoothing: float = 0.1, kl_inputs: int = 512,
            progress: bool = True) -> Setup:
  """Loads the data, loads or trains the classifier (cached), makes cases.

  `label_smoothing=0.1` keeps the trained logit margins near 4 instead of
  15+: flipping a prediction then takes a small weight change, as for a
  calibrated model (the unsmoothed CNN's single edits cost 7-35 points of
  DD with every method tried).
  """
  from keditjax.evaluation import vision_data
  from keditjax.models import cnn
  data = vision_data.load_dataset(dataset, seed=seed)
  classifier, trained = cnn.load_or_train(
      data.train_images, data.train_labels, steps=train_steps,
      batch_size=train_batch_size, lr=train_lr, seed=seed,
      label_smoothing=label_smoothing, progress=progress)
  cases = make_cases(classifier, data.test_images, data.test_labels,
                     kind=edits, num_edits=num_edits, seed=seed,
                     flip_to=flip_to)
  accuracy = _accuracy(classifier, classifier.params, data.test_images,
                       data.test_labels)
  init_kwargs = {"fisher_data": {"images": data.train_images,
                                 "labels": data.train_labels},
                 "kl_inputs": data.train_images[:kl_inputs],
                 "progress": progress}
  trained = dict(trained, train_steps=train_steps, seed=seed,
                 label_smoothing=label_smoothing)
  return Setup(data, classifier, trained, accuracy, cases, init_kwargs)


def sweep_evaluator(dataset: str = "mnist", num_edits: int = 50,
                    mode: str = "single", **prepare_kwargs):
  """An `evaluate(method, overrides) -> metrics` for `tradeoff.sweep`: runs
  `run_vision` on the same cases with `DEFAULT_HPARAMS` + overrides."""
  setup = prepare(dataset, num_edits=num_edits, progress=False,
                  **prepare_kwargs)

  def evaluate(method, overrides):
    editor = build_editors([method], overrides)[method]
    result = run_vision(setup.classifier, editor, setup.cases, mode=mode,
                        test_images=setup.data.test_images,
                        test_labels=setup.data.test_labels,
                        init_kwargs=setup.init_kwargs, progress=False)
    return dict(result["metrics"])

  return evaluate


def _accuracy(classifier, params, images, labels) -> float:
  if not len(labels):
    return float("nan")
  return 100.0 * float(np.mean(classifier.predict(params, images) == labels))


def _extras(info) -> dict:
  """The scalar end of each `info.extras` entry (last loss, steps, ...)."""
  out = {}
  for key, value in getattr(info, "extras", {}).items():
    value = np.asarray(jax.device_get(value))
    if value.size and np.issubdtype(value.dtype, np.number):
      out[key] = float(value.reshape(-1)[-1])
      if value.size > 1:
        out[f"{key}_count"] = int(value.size)
  return out


def run_vision(classifier, editor, cases: Sequence[ImageEdit], *,
               mode: str = "single", test_images, test_labels,
               eval_every: int = 1, init_kwargs: dict | None = None,
               state=None, neighbour_seed: int = 0, progress: bool = True,
               on_step: Callable[[dict], None] | None = None) -> dict:
  """Edits `cases` into `classifier` with `editor` and measures SR/GR/DD/RR.

  Args:
    classifier: a `Classifier`; `classifier.params` is never modified.
    editor: an `Editor`, or None to measure the unedited classifier.
    cases: `ImageEdit`s, in edit order.
    mode: "single" or "sequential" (see the module docstring).
    test_images, test_labels: the test split; images equal to an edited image
      are left out of DD.
    eval_every: sequential: a step record every this many edits (0: only
      after the last; the last edit is always recorded).
    init_kwargs: inputs offered to `editor.init` (`fisher_data`, ...); each
      editor gets those its `init` accepts (`editors.select_inputs`).
    state: an editor state to start from (default: `editor.init(...)`).
    neighbour_seed: the noise seed of the neighbourhoods.
    progress: show a tqdm bar.
    on_step: called with each step record as it is made.

  Returns:
    {"protocol", "method", "n", "metrics", "steps", "cases", "timing"}.
  """
  if mode not in MODES:
    raise errors.ConfigError(f"mode={mode!r}; use one of {MODES}.")
  if eval_every < 0:
    raise errors.ConfigError(f"eval_every={eval_every} must be >= 0.")
  cases = [validate_edit(c, classifier.num_classes, classifier.image_shape)
           for c in cases]
  if not cases:
    raise errors.InputError("no cases to edit.")
  test_images = np.asarray(test_images, np.float32)
  test_labels = np.asarray(test_labels)
  if test_images.shape[1:] != classifier.image_shape or (
      test_labels.shape != (len(test_images),)):
    raise errors.InputError(
        f"test_images {test_images.shape} / test_labels {test_labels.shape} "
        f"do not match the classifier's images {classifier.image_shape}.")
  start_all, seconds = time.perf_counter(), {"init": 0.0, "edit": 0.0,
                                             "eval": 0.0}
  edited = {np.asarray(c.image, np.float32).tobytes() for c in cases}
  keep = np.array([x.tobytes() not in edited for x in test_images], bool)
  dd_images, dd_labels = test_images[keep], test_labels[keep]
  images = np.stack([c.image for c in cases]).astype(np.float32)
  new_labels = np.array([c.label for c in cases])
  hoods = np.stack([neighbourhood(c.image, neighbour_seed) for c in cases])
  params0 = classifier.params
  acc_before = _accuracy(classifier, params0, dd_images, dd_labels)
  pred_before = classifier.predict(params0, images)
  if editor is not None and state is None:
    t = time.perf_counter()
    state = editor.init(classifier, params0, **editors_lib.select_inputs(
        editor, init_kwargs or {}))
    seconds["init"] = time.perf_counter() - t

  def measure(params, idx):
    """Predictions on cases `idx`, their neighbours, and DD-set accuracy."""
    t = time.perf_counter()
    batch = np.concatenate([images[idx], hoods[idx].reshape(
        (-1,) + images.shape[1:]), dd_images])
    pred = classifier.predict(params, batch)
    n, m = len(idx), len(idx) * len(NEIGHBOURS)
    acc = (100.0 * float(np.mean(pred[n + m:] == dd_labels))
           if len(dd_labels) else float("nan"))
    seconds["eval"] += time.perf_counter() - t
    return pred[:n], pred[n:n + m].reshape(n, -1), acc

  rows, steps, edit_seconds, accs = [], [], [], []
  params, held_at_edit = params0, []
  bar = progress_lib.bar(range(len(cases) if editor is not None else 0),
                  disable=not progress, unit="edit",
                  desc=f"{getattr(editor, 'name', 'unedited')} {mode}")
  for i in bar:
    base = params if mode == "sequential" else params0
    t = time.perf_counter()
    new_params, new_state, info = editor.apply(classifier, base, [cases[i]],
                                               state)
    jax.block_until_ready(new_params)
    edit_seconds.append(time.perf_counter() - t)
    seconds["edit"] += edit_seconds[-1]
    row = {"edit_seconds": edit_seconds[-1], **_extras(info)}
    if mode == "single":
      pred, hood, acc = measure(new_params, [i])
      accs.append(acc)
      row.update(predicted_after=int(pred[0]), dd=acc_before - acc,
                 hood_predictions=hood[0].tolist())
      rows.append(row)
      continue
    params, state = new_params, new_state
    now = int(classifier.predict(params, images[i:i + 1])[0])
    held_at_edit.append(now == cases[i].label)
    row.update(step=i + 1, success_at_edit=held_at_edit[-1])
    rows.append(row)
    record = {"step": i + 1, "edits": i + 1,
              "sr_at_edit": 100.0 * held_at_edit[-1],
              "sr_at_edit_so_far": 100.0 * float(np.mean(held_at_edit)),
              "edit_seconds": edit_seconds[-1],
              "changed": sorted(getattr(info, "changed", {}))}
    if (eval_every and (i + 1) % eval_every == 0) or i == len(cases) - 1:
      pred, _, acc = measure(params, np.arange(i + 1))
      held = pred == new_labels[:i + 1]
      earlier = held_at_edit[:-1]
      record.update(
          sr=100.0 * float(held.mean()), test_accuracy=acc,
          dd=acc_before - acc,
          rr=(100.0 * M.retain_rate(earlier, held[:-1]) if any(earlier)
              else None))
    steps.append(record)
    if on_step is not None:
      on_step(record)
    bar.set_postfix({k: round(record[k], 1) for k in ("sr_at_edit_so_far",
                                                      "rr", "dd")
                     if record.get(k) is not None})
  if mode == "sequential" or editor is None:
    pred, hood, acc = measure(params, np.arange(len(cases)))
    accs = [acc]
    if editor is None:
      rows = [{} for _ in cases]
    for row, p, h in zip(rows, pred, hood):
      row.update(predicted_after=int(p), hood_predictions=h.tolist())
  for case, before, row in zip(cases, pred_before, rows):
    row.update(case_id=case.case_id, true_label=case.true_label,
               label=int(case.label), predicted_before=int(before),
               success=row["predicted_after"] == case.label,
               gr=100.0 * float(np.mean(np.asarray(row["hood_predictions"]) ==
                                        case.label)))
  rows = [{k: r[k] for k in ("case_id", "true_label", "label",
                             "predicted_before", "predicted_after", "success",
                             "gr")} | r for r in rows]
  metrics = {
      "sr": 100.0 * float(np.mean([r["success"] for r in rows])),
      "gr": float(np.mean([r["gr"] for r in rows])),
      "dd": acc_before - float(np.mean(accs)),
      "rr": steps[-1]["rr"] if steps else None,
      "test_accuracy_before": acc_before,
      "test_accuracy_after": float(np.mean(accs))}
  if held_at_edit:
    metrics["sr_at_edit"] = 100.0 * float(np.mean(held_at_edit))
  timing = {f"{k}_seconds": v for k, v in seconds.items()}
  timing["total_seconds"] = time.perf_counter() - start_all
  if edit_seconds:
    timing.update(edit_seconds_median=float(np.median(edit_seconds)),
                  edits_per_second=len(cases) / sum(edit_seconds))
  sequential = mode == "sequential" and editor is not None
  return {
      "protocol": {
          "mode": mode if editor is not None else "unedited",
          "successive": sequential, "edit_type": "single",
          "evaluated": ("after every edit" if sequential and eval_every == 1
                        else f"every {eval_every} edits and at the end"
                        if sequential and eval_every else
                        "once, after the last edit" if sequential else
                        "after each edit, on its own model (each from the "
                        "original params)"),
          "eval_every": eval_every if sequential else None,
          "neighbourhood": list(NEIGHBOURS), "neighbour_seed": neighbour_seed,
          "dd_set": f"test split minus the edited images ({len(dd_labels)} "
                    "images)"},
      "method": editor.name if editor is not None else "unedited",
      "n": len(cases), "metrics": metrics, "steps": steps, "cases": rows,
      "timing": timing}


__all__ = ["DEFAULT_HPARAMS", "KINDS", "METHODS", "MODES", "NEIGHBOURS",
           "ImageEdit", "Setup", "build_editors", "default_strengths",
           "prepare", "sweep_evaluator", "make_cases", "neighbourhood", "parse_hparams",
           "run_vision", "validate_edit"]
