"""Markdown tables and the curves figure for issue-18 JSONs (no flags: the
tests import it; `experiments.lifelong_tables` is the command line)."""

LIFELONG = ["edits", "efficacy", "paraphrase", "neighbourhood", "scored",
            "RR", "known_1000 acc", "DD (ceiling)", "perplexity",
            "edit s so far"]
LIFELONG_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score")
WILD = ["judged by", "reliability", "generality", "locality"]
WILD_ROWS = {  # label -> (reliability, generality, locality) keys
    "teacher-forced token accuracy": ("rewrite_acc", "rephrase_acc",
                                      "locality_acc"),
    "teacher-forced all tokens (SR, GR)": ("sr", "gr", None),
}
for _form in ("question", "qa", "chat"):
  for _v in ("exact", "contains"):
    WILD_ROWS[f"WILD {_form}, {_v}"] = (f"{_form}/reliability_{_v}",
                                        f"{_form}/generality_{_v}",
                                        f"{_form}/locality")
MQUAKE = ["method", "cases", "teacher-forced", "WILD exact", "WILD contains",
          "GPT-J (MQuAKE paper)", "edit s"]
SWEEP = ["setting", "efficacy", "paraphrase", "neighbourhood"]
BATCH = ["method", "batch size", "edits (batches)", "efficacy", "paraphrase",
         "neighbourhood", "edit s per edit"]


def fmt(v, digits=1):
  return "" if v is None else f"{v:.{digits}f}"


def lifelong_table(data) -> list[str]:
  lines = ["| " + " | ".join(LIFELONG) + " |",
           "|" + "---|" * len(LIFELONG)]
  base = data["baseline"]
  rows = [dict(base, scored=data["n"], rr=None, dd=None,
               edit_seconds_total=0.0)] + data["checkpoints"]
  for p in rows:
    dd = ("" if p.get("dd") is None else
          f"{p['dd']:.1f} ({p['dd_ceiling']:.1f})")
    cells = [str(p["edits"])] + [fmt(p.get(k)) for k in LIFELONG_KEYS] + [
        str(p["scored"]), fmt(p.get("rr")), fmt(p.get("known_accuracy")), dd,
        fmt(p.get("perplexity"), 2), fmt(p.get("edit_seconds_total"), 0)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def wild_table(data) -> list[str]:
  m = data["metrics"]
  lines = ["| " + " | ".join(WILD) + " |", "|" + "---|" * len(WILD)]
  for label, keys in WILD_ROWS.items():
    if m.get(keys[0]) is None:
      continue
    lines.append("| " + " | ".join(
        [label] + [fmt(m.get(k)) if k else "" for k in keys]) + " |")
  return lines


def mquake_table(data) -> list[str]:
  lines = ["| " + " | ".join(MQUAKE) + " |", "|" + "---|" * len(MQUAKE)]
  paper = data["paper_gptj"]
  for r in data["rows"]:
    which = "old" if r["method"] == "none" else "new"
    name = "unedited (old answers)" if r["method"] == "none" else r["method"]
    quoted = paper.get("before" if r["method"] == "none" else r["method"])
    lines.append("| " + " | ".join([
        name, str(r["n"]), fmt(r[f"{which}_tf"]),
        fmt(r[f"{which}_wild_exact"]), fmt(r[f"{which}_wild_contains"]),
        fmt(quoted), fmt(r["edit_seconds"], 0)]) + " |")
  return lines


def sweep_table(data) -> list[str]:
  lines = ["| " + " | ".join(SWEEP) + " |", "|" + "---|" * len(SWEEP)]
  for r in data["rows"]:
    lines.append("| " + " | ".join([r["setting"]] + [
        fmt(r[k]) for k in LIFELONG_KEYS]) + " |")
  return lines


NULLSPACE = ["layer", "relative threshold", "null-space dims",
             "share of E‖k‖² inside (%)", "λ_min/λ_max", "λ_max share (%)"]


def nullspace_table(data) -> list[str]:
  lines = ["| " + " | ".join(NULLSPACE) + " |", "|" + "---|" * len(NULLSPACE)]
  for r in data["rows"]:
    lines.append("| " + " | ".join([
        str(r["layer"]), f"{r['threshold']:g}", f"{r['dims']} / {r['features']}",
        fmt(r["energy_share"]), f"{r['min_over_max']:.1e}",
        fmt(r["top_share"])]) + " |")
  return lines


def batch_table(data) -> list[str]:
  lines = ["| " + " | ".join(BATCH) + " |", "|" + "---|" * len(BATCH)]
  for r in data["rows"]:
    spe = fmt(r["seconds_per_edit"], 2) + (" (compiles)" if
                                           r["first_for_method"] else "")
    lines.append("| " + " | ".join(
        [r["method"], str(r["batch_size"]), f"{r['n']} ({r['batches']})"] +
        [fmt(r[k]) for k in LIFELONG_KEYS] + [spe]) + " |")
  return lines


def batch_plot(data, path):
  """Quality and editing seconds per edit against batch size (log x)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = LIFELONG_KEYS + ("seconds_per_edit",)
  titles = ("efficacy (%)", "paraphrase (%)", "neighbourhood (%)",
            "editing seconds per edit")
  fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
  for method in dict.fromkeys(r["method"] for r in data["rows"]):
    rows = [r for r in data["rows"] if r["method"] == method]
    for ax, key, title in zip(axes, panels, titles):
      ax.plot([r["batch_size"] for r in rows], [r[key] for r in rows],
              marker="o", label=method)
      ax.set_xscale("log")
      ax.set_title(title)
      ax.set_xlabel("batch size")
  for ax in axes[:-1]:
    ax.set_ylim(0, 100)
  axes[-1].set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot(runs, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = (("efficacy_score", "efficacy (%)"),
            ("paraphrase_score", "paraphrase (%)"),
            ("neighborhood_score", "neighbourhood (%)"),
            ("known_accuracy", "known_1000 accuracy (%)"),
            ("perplexity", "WikiText-2 test perplexity"))
  fig, axes = plt.subplots(1, len(panels), figsize=(20, 3.8))
  for data in runs:
    points = [dict(data["baseline"])] + data["checkpoints"]
    label = f"{data['method']} ×{data['plan']['batch_size']}"
    for ax, (key, title) in zip(axes, panels):
      ax.plot([p["edits"] for p in points], [p.get(key) for p in points],
              marker="o", label=label)
      ax.set_title(title)
      ax.set_xlabel("edits")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
