"""The reliability–locality trade-off: sweep a regularizer's strength.

Every regularized editor has one knob that trades edit success against
damage elsewhere (`STRENGTH`): FT-L's L∞ radius δ (larger: freer), FT+KL's
KL weight and EWC's λ (larger: stiffer). `sweep` runs one evaluation per
value and collects SR and DD (and whatever else the evaluation reports);
`plot` draws SR against DD, one line per method, each point labelled with
its value, so a setting can be read off the curve.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
from keditjax import progress as progress_lib

from keditjax import errors

# method -> (hyper-parameter swept, True if a larger value edits more freely)
STRENGTH = {"ftl": ("radius", True), "ftkl": ("kl_weight", False),
            "ewc": ("ewc_lambda", False)}


def parse_values(text: str) -> list[float]:
  """"1e-3,3e-3,1e-2" -> [0.001, 0.003, 0.01], all positive."""
  try:
    values = [float(v) for v in str(text).split(",") if v.strip()]
  except ValueError as e:
    raise errors.ConfigError(f"sweep values {text!r}: {e}.")
  if not values or min(values) <= 0:
    raise errors.ConfigError(
        f"sweep values {text!r} must be a non-empty list of positive numbers.")
  return values


def sweep(evaluate: Callable[[str, dict], dict], method: str,
          values: Sequence[float], progress: bool = True) -> list[dict]:
  """One evaluation per strength value.

  Args:
    evaluate: `(method, hparams overrides) -> metrics dict` (with "sr" and
      "dd" at least).
    method: a key of `STRENGTH`.
    values: the strengths to try.
    progress: show a tqdm bar.

  Returns:
    Rows `{"method", "param", "value", "seconds", **metrics}`.
  """
  if method not in STRENGTH:
    raise errors.ConfigError(
        f"no strength to sweep for {method!r}; methods: {sorted(STRENGTH)}.")
  param = STRENGTH[method][0]
  rows = []
  for value in progress_lib.bar(list(values), desc=f"sweep {method}", disable=not progress):
    start = time.perf_counter()
    metrics = evaluate(method, {param: float(value)})
    rows.append({"method": method, "param": param, "value": float(value),
                 "seconds": time.perf_counter() - start, **metrics})
  return rows


def monotonicity(rows: Sequence[dict], key: str = "sr") -> float:
  """Share of consecutive value pairs (from stiff to free) where `key`
  does not fall: 1.0 is a perfectly monotone trade-off curve."""
  if len(rows) < 2:
    return 1.0
  method = rows[0]["method"]
  freer = STRENGTH[method][1]
  ordered = sorted(rows, key=lambda r: r["value"], reverse=not freer)
  pairs = list(zip(ordered, ordered[1:]))
  ok = sum(b[key] >= a[key] - 1e-9 for a, b in pairs)
  return ok / len(pairs)


def plot(rows: Sequence[dict], path: str, title: str = "",
         x: str = "dd", y: str = "sr", xlabel: str = "DD (points)",
         ylabel: str = "SR (%)", chosen: dict | None = None) -> str:
  """SR against DD, one line per method (ordered stiff → free), points
  labelled by value; `chosen` ({method: value}) rings the default."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    mine.sort(key=lambda r: r["value"], reverse=not STRENGTH[method][1])
    xs, ys = [r[x] for r in mine], [r[y] for r in mine]
    line, = ax.plot(xs, ys, "o-", label=f"{method} ({mine[0]['param']})")
    for r in mine:
      ax.annotate(f"{r['value']:g}", (r[x], r[y]), textcoords="offset points",
                  xytext=(4, 4), fontsize=7, color=line.get_color())
      if chosen and chosen.get(method) is not None and np.isclose(
          r["value"], chosen[method]):
        ax.plot([r[x]], [r[y]], "o", ms=13, mfc="none",
                color=line.get_color())
  spread = [abs(r[x]) for r in rows if r.get(x) is not None]
  if spread and max(spread) > 20:  # diverged points would squash the rest
    ax.set_xscale("symlog", linthresh=2.0)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title or "Reliability–locality trade-off")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


LM_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "sr",
           "gr", "dd", "efficacy_magnitude", "neighborhood_magnitude")


def language_model_evaluator(model, cases, *, heldout=None, protocol=None,
                             base: dict | None = None, progress: bool = False):
  """An `evaluate` for `sweep` on a language model through the harness.

  Every call edits each case into f0 (`protocol`, default single edits
  without fluency), and reports the harness's CounterFact scores, SR/GR,
  DD on `heldout`, and `neighborhood_drop`: the unedited model's
  neighbourhood score on the same cases minus the edited one (points).

  Args:
    model: the `LanguageModel`.
    cases: `EditCase`s.
    heldout: facts for DD (None: no DD, reported as 0).
    protocol: a `protocols.Protocol`.
    base: hyper-parameter overrides applied to every point (e.g. the
      `params_regex`).
    progress: per-run progress bars.
  """
  from keditjax import editors
  from keditjax.evaluation import protocols
  protocol = protocol or protocols.Protocol("single", fluency=False,
                                            dd_every=5)
  unedited = protocols.run(model, None, cases, protocol, heldout=None,
                           progress=False)["metrics"]

  def evaluate(method, overrides):
    editor = editors.get(method, **{**(base or {}), **overrides})
    result = protocols.run(model, editor, cases, protocol, heldout=heldout,
                           progress=progress)
    row = {k: result["metrics"].get(k) for k in LM_KEYS}
    row["dd"] = row["dd"] or 0.0
    row["neighborhood_drop"] = (unedited["neighborhood_score"] -
                                row["neighborhood_score"])
    row["unedited_neighborhood"] = unedited["neighborhood_score"]
    row["unedited_efficacy"] = unedited["efficacy_score"]
    return row

  return evaluate


def plot_strength(rows: Sequence[dict], path: str, title: str = "",
                  chosen: dict | None = None,
                  left: tuple = ("sr", "SR (%)"),
                  right: tuple = ("dd", "DD (points)")) -> str:
  """One panel per method: `left` (default SR) and `right` (default DD)
  metrics against the swept value (log scale); the dotted line marks the
  default."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401 (used through matplotlib.ticker)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6),
                           squeeze=False)
  for ax, method in zip(axes[0], methods):
    mine = sorted((r for r in rows if r["method"] == method),
                  key=lambda r: r["value"])
    xs = [r["value"] for r in mine]
    ax.plot(xs, [r[left[0]] for r in mine], "o-", color="tab:blue")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel(left[1], color="tab:blue")
    ax.set_xlabel(mine[0]["param"])
    twin = ax.twinx()
    twin.plot(xs, [r[right[0]] for r in mine], "s--", color="tab:red")
    twin.set_ylabel(right[1], color="tab:red")
    if max(abs(r[right[0]]) for r in mine) > 20:
      twin.set_yscale("symlog", linthresh=2.0)
    if chosen and chosen.get(method) is not None:
      ax.axvline(chosen[method], color="gray", ls=":")
    ax.set_title(method)
    ax.grid(alpha=0.3)
  fig.suptitle(title or "SR and DD against the regularization strength")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def summary_markdown(rows: Sequence[dict]) -> str:
  """A markdown table: one row per swept point, every metric it has."""
  fixed = ("method", "param", "value", "sr", "dd")
  rest = [k for k in rows[0] if k not in fixed]
  lines = ["| method | param | value | SR | DD | " + " | ".join(rest) + " |",
           "|" + "---|" * (len(rest) + 5)]
  for r in rows:
    cells = [f"{r.get(k):.3g}" if isinstance(r.get(k), float) else
             str(r.get(k)) for k in rest]
    lines.append(f"| {r['method']} | {r['param']} | {r['value']:g} | "
                 f"{r['sr']:.1f} | {r['dd']:.2f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write(result: dict, output_dir: str, title: str) -> str:
  """results.json (with each method's monotonicity), summary.md, sr_dd.png
  and strength.png; for language models also efficacy against the
  neighbourhood drop (`efficacy_neighborhood.png`, `strength_locality.png`).

  Returns:
    The summary table.
  """
  import json
  import os
  rows, chosen = result["rows"], result.get("chosen")
  methods = list(dict.fromkeys(r["method"] for r in rows))
  result = dict(result, monotonicity={m: monotonicity(
      [r for r in rows if r["method"] == m]) for m in methods})
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = summary_markdown(rows)
  with open(os.path.join(output_dir, "summary.md"), "w") as f:
    f.write(table)
  path = lambda name: os.path.join(output_dir, name)
  plot(rows, path("sr_dd.png"), title=f"SR vs DD, {title}", chosen=chosen)
  plot_strength(rows, path("strength.png"), chosen=chosen,
                title=f"SR and DD vs strength, {title}")
  if all("neighborhood_drop" in r for r in rows):  # the field's locality
    plot(rows, path("efficacy_neighborhood.png"), chosen=chosen,
         title=f"Efficacy vs neighbourhood drop, {title}",
         x="neighborhood_drop", y="efficacy_score",
         xlabel="neighbourhood drop (points)", ylabel="efficacy (%)")
    plot_strength(rows, path("strength_locality.png"), chosen=chosen,
                  title=f"Efficacy and neighbourhood drop vs strength, {title}",
                  left=("efficacy_score", "efficacy (%)"),
                  right=("neighborhood_drop", "neighbourhood drop (points)"))
  return table
