"""docs/RESULTS.md and the README's result tables say what the stored JSONs say.

Every row of every RESULTS.md table is regenerated from the JSON it names
(its `JSON` column, or the caption before the table) in docs/results/ or
docs/benchmarks/, and each number is compared at the precision it is shown
with: a cell "93.1" must be within 0.05 of the JSON's value. Editing a number
in either place, adding a table this test does not know, or citing a JSON that
does not exist fails. Pure Python: no model, no network, well under a second.
"""

import glob
import json
import math
import os
import re
import statistics

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
RESULTS_MD = os.path.join(DOCS, "RESULTS.md")
NO_JSON = "no stored JSON"


# -- parsing ----------------------------------------------------------------

def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _load(rel):
  """A JSON under docs/ (`rel` as the markdown links it, e.g. results/x.json)."""
  path = os.path.join(DOCS, rel)
  assert os.path.exists(path), f"the docs cite {rel}, which does not exist"
  with open(path) as f:
    return json.load(f)


def _cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text):
  """[(header, rows, context)] of the markdown tables in `text`.

  rows: [(cells, line number)]; context: the prose between the previous
  heading (or table) and this table, where a caption names its JSON.
  """
  lines = text.split("\n")
  out, context, i = [], [], 0
  while i < len(lines):
    line = lines[i].strip()
    if (line.startswith("|") and i + 1 < len(lines)
        and re.match(r"^\|\s*-{3}", lines[i + 1].strip())):
      header, rows, i = _cells(line), [], i + 2
      while i < len(lines) and lines[i].strip().startswith("|"):
        rows.append((_cells(lines[i]), i + 1))
        i += 1
      out.append((header, rows, "\n".join(context)))
      context = []
      continue
    context = [] if line.startswith("#") else context + [lines[i]]
    i += 1
  return out


def _clean(cell):
  return cell.replace("**", "").replace("−", "-").strip()


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def numbers(cell):
  """The numbers of a cell, each as (value, decimals shown)."""
  out = []
  for m in NUMBER.finditer(_clean(cell).replace("known_1000", "")):
    s = m.group()
    decimals = len(s.split(".")[1].split("e")[0]) if "." in s else 0
    out.append((float(s), decimals))
  return out


def shown(cell, value, where, index=0):
  """The `index`-th number of `cell` is `value` at the precision shown."""
  if value is None:
    assert _clean(cell) in ("", "—"), f"{where}: {cell!r} but the JSON has none"
    return
  found = numbers(cell)
  assert len(found) > index, f"{where}: no number in {cell!r} (JSON {value})"
  got, decimals = found[index]
  tolerance = 0.5 * 10 ** -decimals + 1e-9
  assert abs(got - value) <= tolerance, (
      f"{where}: the doc says {cell!r}, the JSON says {value}")


def json_link(cell):
  m = re.search(r"\]\(((?:results|benchmarks)/[^)]+\.json)\)", cell)
  return m and m.group(1)


def caption_json(context):
  """The last JSON the caption before a table names."""
  found = re.findall(r"((?:results|benchmarks)/[\w/.-]+\.json)", context)
  assert found, "a table with no JSON column needs a caption naming its JSON"
  return found[-1]


# -- the harness tables (experiments.evaluate results.json) -----------------

# A column name -> the metric key, by dataset (None: the same key).
METRIC_COLUMNS = {
    "efficacy": {"zsre": "zsre_efficacy", "counterfact": "efficacy_score"},
    "paraphrase": {"zsre": "zsre_paraphrase",
                   "counterfact": "paraphrase_score"},
    "specificity / neighbourhood": {"zsre": "zsre_specificity",
                                    "counterfact": "neighborhood_score"},
    "locality acc": "locality_acc",
    "nq locality acc": "locality_acc",
    "sr": "sr", "gr": "gr", "rr": "rr",
    "dd": "dd", "dd (known_1000)": "dd",
}
HARNESS_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score",
                "efficacy_magnitude", "fluency", "rewrite_acc", "rephrase_acc",
                "locality_acc", "sr", "gr", "dd", "rr", "zsre_efficacy",
                "zsre_paraphrase", "zsre_specificity", "portability_acc")


def _metric_key(column, dataset):
  key = METRIC_COLUMNS.get(column.lower(), column)
  return key[dataset] if isinstance(key, dict) else key


def _protocol(results):
  p = results["protocol"]
  if p["mode"] == "unedited":
    return "unedited"
  return p["mode"] + (f" ×{p['batch_size']}" if p["batch_size"] > 1 else "")


def _check_command(cell, results, where):
  """The row's `experiments.evaluate` command ran what the JSON records."""
  flags = dict(re.findall(r"--([\w.]+)=(\S+?)`?(?=\s|$)", cell))
  command, protocol = results["command"], results["protocol"]
  method = flags.get("method", "rome")
  assert (method == "none") == (results["method"] == "unedited"), where
  if method != "none":
    assert method == results["method"], where
  assert flags.get("dataset", "counterfact") == command["dataset"], where
  assert int(flags["num_edits"]) == command["num_edits"] == results["n"], where
  # --heldout's default is known_1000 (it was auto; the oldest JSONs do not
  # record it).
  if "heldout" in command:
    assert flags.get("heldout", "known_1000") == command["heldout"], (
        f"{where}: the command's --heldout is not the JSON's")
  if protocol["mode"] != "unedited":
    assert flags.get("mode", "single") == protocol["mode"], where
    assert int(flags.get("batch_size", 1)) == protocol["batch_size"], where
    if protocol["mode"] != "sequential":
      assert int(flags.get("dd_every", 10)) == protocol["dd_every"], where
  for flag, value in flags.items():  # --config.<method>.<field>=value
    if flag.startswith("config."):
      field = flag.split(".", 2)[2]
      assert str(results["hparams"][field]) == value, (
          f"{where}: the command's {field} is not the JSON's")


def check_harness_row(header, cells, results, where):
  dataset = results["command"]["dataset"]
  for column, cell in zip(header, cells):
    name = column.lower()
    if name == "method":
      if header[1] == "protocol":  # results_table's rows: the method's name
        assert cell == results["method"], where
      else:  # a description: "FT", "MEND, 750 steps", ...
        want = ("ft" if _clean(cell).startswith("FT") else
                "unedited" if _clean(cell) == "unedited" else "mend")
        assert results["method"] == want, f"{where}: {cell} vs {want}"
    elif name == "protocol":
      assert cell == _protocol(results), where
    elif name == "data":
      assert {"zsRE": "zsre", "CounterFact": "counterfact"}[cell] == dataset
    elif name == "n":
      assert int(cell) == results["n"], where
    elif name == "time":
      assert cell.endswith(" min"), where
      shown(cell, results["timing"]["total_seconds"] / 60, where + " time")
    elif name == "command":
      if "experiments.evaluate" in cell:
        _check_command(cell, results, where)
    elif name == "json":
      pass
    else:
      key = _metric_key(column, dataset)
      assert key in HARNESS_KEYS, f"{where}: unknown column {column!r}"
      shown(cell, results["metrics"].get(key), f"{where} {column}")


# -- the other tables -------------------------------------------------------

def _strength(cell):
  param, value = [s.strip() for s in cell.split("=")]
  return param, float(value)


def _sweep_row(rows, method, strength, where):
  param, value = _strength(strength)
  found = [r for r in rows if r["method"] == method and r["param"] == param
           and math.isclose(r["value"], value, rel_tol=1e-9)]
  assert len(found) == 1, f"{where}: {method} {strength} is not in the JSON"
  return found[0]


def check_tradeoff_lm(header, rows, data, where):
  assert header == ["method", "strength", "efficacy", "paraphrase",
                    "neighbourhood (drop)", "SR", "GR", "DD"]
  assert len(rows) == len(data["rows"]), f"{where}: not every point is shown"
  for cells, line in rows:
    at = f"{where}:{line}"
    r = _sweep_row(data["rows"], cells[0], cells[1], at)
    shown(cells[2], r["efficacy_score"], at)
    shown(cells[3], r["paraphrase_score"], at)
    shown(cells[4], r["neighborhood_score"], at)
    shown(cells[4], r["neighborhood_drop"], at + " drop", index=1)
    shown(cells[5], r["sr"], at)
    shown(cells[6], r["gr"], at)
    shown(cells[7], r["dd"], at)


def check_tradeoff_vision(header, rows, data, where):
  assert header == ["method", "strength", "SR", "DD", "GR"]
  assert len(rows) == len(data["rows"]), f"{where}: not every point is shown"
  for cells, line in rows:
    at = f"{where}:{line}"
    r = _sweep_row(data["rows"], cells[0], cells[1], at)
    for cell, key in zip(cells[2:], ("sr", "dd", "gr")):
      shown(cell, r[key], at)


VISION_METHODS = {"FT": "ft", "FT-L": "ftl", "FT+KL": "ftkl", "EWC": "ewc"}


def check_vision(header, cells, data, where):
  assert header == ["edits", "method", "SR", "SR at edit", "GR", "DD", "RR",
                    "command", "JSON"]
  count = int(cells[0].split()[0])
  assert count == data["n"], where
  assert ("successive" in cells[0]) == (data["protocol"]["mode"]
                                        == "sequential"), where
  if "vision_edit" in cells[7]:
    assert f"--num_edits={count}" in cells[7], where
  methods = [VISION_METHODS[m.strip()] for m in cells[1].split("/")]
  columns = {2: "sr", 3: "sr_at_edit", 4: "gr", 5: "dd", 6: "rr"}
  for i, name in enumerate(methods):
    metrics = data["methods"][name]["metrics"]
    for col, key in columns.items():
      parts = cells[col].split(" / ")
      cell = parts[i] if len(parts) == len(methods) else cells[col]
      shown(cell, metrics.get(key), f"{where} {name} {header[col]}")


FEVER_METHODS = {"KnowledgeEditor": "knowledge_editor", "MEND": "mend",
                 "FT-L": "ftl"}


def check_fever(header, rows, data, where):
  assert header == ["method", "SR", "GR", "GR, rules never trained on",
                    "DD (points)", "unchanged verdicts", "training"]
  assert len(rows) == len(data["methods"])
  for cells, line in rows:
    at = f"{where}:{line}"
    name = FEVER_METHODS[_clean(cells[0]).split()[0]]
    entry = data["methods"][name]
    keys = ("sr", "gr", "gr_heldout_rules", "dd", "retained_verdicts")
    for cell, key in zip(cells[1:6], keys):
      shown(cell, entry["metrics"][key], f"{at} {key}")
    if "radius" in entry:
      shown(re.search(r"radius ([\d.e-]+)", cells[0]).group(1),
            entry["radius"], at + " radius")
    training = entry.get("training")
    if training is None:
      assert _clean(cells[6]) == "—", at
      continue
    m = re.fullmatch(r"(\d+) steps \(best (\d+)\), ([\d.]+) (s|min)",
                     _clean(cells[6]))
    assert m, f"{at}: training cell {cells[6]!r}"
    assert int(m.group(1)) == training["steps"], at
    assert int(m.group(2)) == training["best_step"], at
    seconds = training["seconds"] / (60 if m.group(4) == "min" else 1)
    shown(m.group(3), seconds, at + " training time")


ENN_EDITORS = {"FT": "ft", "ENN editor": "enn", "ENN": "enn"}
ENN_CNNS = {"ordinary": "ordinary", "meta-trained": "enn"}


def check_enn(header, rows, data, where):
  assert header == ["edits", "editor / CNN", "SR", "GR", "DD", "RR"]
  for cells, line in rows:
    at = f"{where}:{line}"
    editor, cnn = [s.strip() for s in _clean(cells[1]).split(" / ")]
    kind = "successive" if "successive" in cells[0] else "single"
    metrics = data[kind][f"{ENN_EDITORS[editor]}/{ENN_CNNS[cnn]}"]
    for cell, key in zip(cells[2:], ("sr", "gr", "dd", "rr")):
      shown(cell, metrics.get(key), f"{at} {key}")


FAMILY_QUALITY = ["method", "dataset", "rel.", "gen.", "loc.", "RR", "DD",
                  "modules after 100", "median edit s",
                  "1,000 edits (est. h)"]
FAMILY_COST = ["method", "edits", "added params", "b1 ms/token",
               "b8 ms/token", "peak RSS MiB"]


def check_family(header, rows, data, where):
  """The architectural family's tables (experiments/family.py)."""
  if header == FAMILY_QUALITY:
    for cells, line in rows:
      at = f"{where}:{line}"
      [r] = [r for r in data["quality"]
             if (r["method"], r["dataset"]) == (cells[0], cells[1])]
      if r["status"] != "measured":
        assert cells[2] == "not run", at
        continue
      for cell, key in zip(cells[2:7], ("reliability", "generalisation",
                                         "locality", "rr", "dd")):
        shown(cell, r[key], f"{at} {key}")
      for k, v in r["modules"].items():
        assert f"{k} {v}" in cells[7], f"{at} modules"
      shown(cells[8], r["edit_seconds_median"], at + " edit s")
      shown(cells[9], r["estimate_1000_hours"], at + " estimate")
    return
  assert header == FAMILY_COST, where
  for cells, line in rows:
    at = f"{where}:{line}"
    cost = data["cost"][cells[0]]
    by = {r["batch"]: r for r in cost["rows"]
          if r["edits"] == int(cells[1]) and r["scope"] == "out"}
    shown(cells[2], by[1]["added_params"], at + " added")
    shown(cells[3], by[1]["ms_per_token"], at + " b1")
    shown(cells[4], by[8]["ms_per_token"], at + " b8")
    shown(cells[5], cost["peak_rss_mib"], at + " rss")


def check_generated(header, rows, data, where):
  """Issue-18 tables (lifelong curves, WILD beside teacher-forced, MQuAKE,
  UltraEdit sweeps): every row equals `experiments.lifelong_render`'s
  rendering of the captioned JSON (bold aside)."""
  from experiments import lifelong_render as lt  # pylint: disable=import-outside-toplevel
  from experiments import stream_render as sr  # pylint: disable=import-outside-toplevel
  make = {tuple(lt.LIFELONG): lt.lifelong_table, tuple(lt.WILD): lt.wild_table,
          tuple(sr.STREAM): sr.stream_table,
          tuple(sr.ROLLBACK): sr.rollback_table,
          tuple(lt.MQUAKE): lt.mquake_table,
          tuple(lt.SWEEP): lt.sweep_table,
          tuple(lt.BATCH): lt.batch_table,
          tuple(lt.NULLSPACE): lt.nullspace_table}[tuple(header)]
  want = [_cells(line) for line in make(data)[2:]]
  got = [[_clean(c) for c in cells] for cells, _ in rows]
  assert got == [[_clean(c) for c in w] for w in want], where


def _generated_headers():
  from experiments import lifelong_render as lt  # pylint: disable=import-outside-toplevel
  from experiments import stream_render as sr  # pylint: disable=import-outside-toplevel
  return (lt.LIFELONG, lt.WILD, lt.MQUAKE, lt.SWEEP, lt.BATCH,
          lt.NULLSPACE, sr.STREAM, sr.ROLLBACK)


# Tables with no JSON behind them (plans, not measurements).
NOT_MEASURED = (["row", "estimated time on this CPU"],)


def _results_tables():
  return tables(_read(RESULTS_MD))


def test_every_results_table_matches_its_json():
  checked = 0
  for header, rows, context in _results_tables():
    where = f"RESULTS.md table '{' | '.join(header[:4])}'"
    if header in NOT_MEASURED:
      continue
    if header[-1] == "JSON":
      for cells, line in rows:
        at = f"RESULTS.md:{line}"
        assert len(cells) == len(header), f"{at}: {len(cells)} cells"
        link = json_link(cells[-1])
        if link is None:
          assert cells[-1] == NO_JSON, f"{at}: no JSON named"
          continue
        data = _load(link)
        if header[0] == "edits":
          check_vision(header, cells, data, at)
        else:
          check_harness_row(header, cells, data, at)
        checked += 1
      continue
    source = caption_json(context)
    data = _load(source)
    if "strength" in header and "efficacy" in header:
      check_tradeoff_lm(header, rows, data, where)
    elif "strength" in header:
      check_tradeoff_vision(header, rows, data, where)
    elif header[0] == "method" and "unchanged verdicts" in header:
      check_fever(header, rows, data, where)
    elif header[1] == "editor / CNN":
      check_enn(header, rows, data, where)
    elif header in (FAMILY_QUALITY, FAMILY_COST):
      check_family(header, rows, data, where)
    elif header in _generated_headers():
      check_generated(header, rows, data, where)
    else:
      pytest.fail(f"{where}: a table this test does not check; add a checker")
    checked += len(rows)
  assert checked >= 80


def test_rows_without_json_are_the_known_baselines():
  """Rows quoting numbers no stored JSON backs; each needs its run stored."""
  missing = [cells[:3] for header, rows, _ in _results_tables()
             for cells, _ in rows if cells[-1] == NO_JSON]
  assert missing == []


def test_every_stored_result_is_cited_and_every_citation_exists():
  text = _read(RESULTS_MD)
  stored = glob.glob(os.path.join(DOCS, "results", "**", "*.json"),
                     recursive=True)
  for path in stored:
    name = os.path.basename(path)
    assert name in text, f"RESULTS.md never cites {name}"
  for rel in re.findall(r"\]\(((?:results|benchmarks)/[^)]+)\)", text):
    assert os.path.exists(os.path.join(DOCS, rel)), f"{rel} does not exist"


def test_prose_numbers_match_the_jsons():
  text = " ".join(_read(RESULTS_MD).split())
  # Covariance statistics of every ROME / MEMIT row.
  tokens = {_load(f"results/{n}.json")["hparams"]["mom2_tokens"]
            for n in ("rome_cf100", "rome_seq100", "rome_cf20_b5",
                      "memit_cf500_b100", "memit_seq100_b10",
                      "memit_cf20_single", "memit_zsre200_b100")}
  k = int(re.search(r"covariance from (\d+)k WikiText-2 tokens", text).group(1))
  assert tokens == {1000 * k}
  # MEND: the network's blocks and rank, and the CounterFact fluency range.
  first, last, rank = map(int, re.search(
      r"blocks (\d+)–(\d+), with a rank-(\d+) editor network", text).groups())
  fluency = []
  for path in glob.glob(os.path.join(DOCS, "results", "mend_*.json")):
    with open(path) as f:
      results = json.load(f)
    assert results["hparams"]["rank"] == rank, path
    assert results["hparams"]["layers"] == list(range(first, last + 1)), path
    if results["command"]["dataset"] == "counterfact":
      fluency.append(results["metrics"]["fluency"])
  low, high = re.search(r"n-gram entropy \((\d+)–(\d+) across", text).groups()
  shown(low, min(fluency), "MEND fluency low")
  shown(high, max(fluency), "MEND fluency high")
  # The unedited baselines the prose quotes, and the trade-off's own
  # unedited pass on the first 20 records.
  for n, name in ((100, "unedited_cf100"), (20, "unedited_cf20")):
    m = re.search(rf"(?:first {n} records scores|first {n} it scores) "
                  r"([\d.]+) / ([\d.]+) / ([\d.]+)", text)
    assert m, f"the unedited {n}-record sentence"
    metrics = _load(f"results/{name}.json")["metrics"]
    for got, key in zip(m.groups(), ("efficacy_score", "paraphrase_score",
                                     "neighborhood_score")):
      shown(got, metrics[key], f"{name} {key}")
  lm = _load("results/tradeoff_lm.json")["rows"]
  cf20 = _load("results/unedited_cf20.json")["metrics"]
  assert {r["unedited_efficacy"] for r in lm} == {cf20["efficacy_score"]}
  assert {r["unedited_neighborhood"] for r in lm} == {cf20["neighborhood_score"]}
  m = re.search(r"unedited on those 50: ([\d.]+) / ([\d.]+) / ([\d.]+)", text)
  cf50 = _load("results/unedited_cf50.json")["metrics"]
  for got, key in zip(m.groups(), ("efficacy_score", "paraphrase_score",
                                   "neighborhood_score")):
    shown(got, cf50[key], f"unedited_cf50 {key}")
  m = re.search(r"first 200 zsRE records scores ([\d.]+) / ([\d.]+) / "
                r"([\d.]+) \(efficacy / paraphrase / specificity\), with "
                r"portability ([\d.]+)", text)
  zs = _load("results/unedited_zsre200.json")["metrics"]
  for got, key in zip(m.groups(), ("zsre_efficacy", "zsre_paraphrase",
                                   "zsre_specificity", "portability_acc")):
    shown(got, zs[key], f"unedited_zsre200 {key}")


# -- README -----------------------------------------------------------------

def _readme_table(first_columns):
  for header, rows, _ in tables(_read(os.path.join(ROOT, "README.md"))):
    if header[:len(first_columns)] == first_columns:
      return rows
  pytest.fail(f"README has no table starting {first_columns}")


def test_readme_counterfact200_table_matches_the_benchmark_jsons():
  rome = _load("benchmarks/rome_counterfact200.json")
  memit = _load("benchmarks/memit_counterfact200.json")
  assert rome["unedited"] == memit["unedited"]
  runs = {"unedited": rome["unedited"], "ROME": rome["edited"],
          "MEMIT": memit["edited"]}
  rows = _readme_table(["", "efficacy", "paraphrase", "neighbourhood"])
  assert len(rows) == 3
  for cells, line in rows:
    where = f"README.md:{line}"
    scores = runs[cells[0].split(",")[0]]
    for cell, key in zip(cells[1:4], ("efficacy_score", "paraphrase_score",
                                      "neighborhood_score")):
      shown(cell, scores[key], where)
    if cells[0].startswith("ROME"):
      times = sorted(rome["edit_seconds"])
      n = len(times)
      median = (times[(n - 1) // 2] + times[n // 2]) / 2
      shown(cells[4], median, where + " median")
      assert f"layer {rome['hparams']['layer']}" in cells[0]
    elif cells[0].startswith("MEMIT"):
      shown(cells[4], sum(memit["edit_seconds"]), where + " time")
      hp = memit["hparams"]
      lam = re.search(r"λ = (\d+)", cells[0]).group(1)
      assert int(lam) == hp["lambda_per_unit"] * 1536  # SmolLM2's MLP width
      assert f"layers {hp['layers'][0]}-{hp['layers'][-1]}" in cells[0]


def test_readme_sweep_sentence_matches_the_sweep_json():
  text = " ".join(_read(os.path.join(ROOT, "README.md")).split())
  m = re.search(r"gives paraphrase ([\d.]+)-([\d.]+) for λ (\d+)-(\d+)", text)
  assert m, "the README's MEMIT sweep sentence"
  rows = [r for r in _load("benchmarks/memit_counterfact200_sweep.json")["rows"]
          if "ctx" not in r and "extra" not in r]  # the plain λ sweep
  lams = sorted(r["lambda"] for r in rows)
  paraphrase = [r["paraphrase_score"] for r in rows]
  assert (float(m.group(3)), float(m.group(4))) == (lams[0], lams[-1])
  shown(m.group(1), min(paraphrase), "sweep low")
  shown(m.group(2), max(paraphrase), "sweep high")


def test_readme_benchmark_table_matches_the_benchmark_jsons():
  forward = _load("benchmarks/forward_cpu.json")["results"]
  generate = _load("benchmarks/generate_cpu.json")["results"]
  rows = _readme_table(["task", "batch × length", "compile (s)"])
  assert len(rows) == len(forward) + len(generate)
  for cells, line in rows:
    where = f"README.md:{line}"
    if cells[0] == "forward":
      batch, length = (int(x) for x in cells[1].split("×"))
      [r] = [r for r in forward if (r["batch"], r["length"]) == (batch, length)]
    else:
      new = int(re.search(r"\((\d+) new\)", cells[0]).group(1))
      [r] = [r for r in generate if r["batch"] == int(cells[1])
             and r["new_tokens"] == new]
    shown(cells[2], r["compile_s"], where + " compile")
    shown(cells[3], 1000 * r["steady_s"], where + " steady")
    shown(cells[4], r["tokens_per_s"], where + " tokens/s")


def _readme_match(pattern, what):
  """The README (whitespace collapsed) matched against `pattern`."""
  text = " ".join(_read(os.path.join(ROOT, "README.md")).split())
  m = re.search(pattern, text)
  assert m, f"the README's {what}"
  return m, text


def test_readme_rome_edit_benchmark_sentence_matches_its_json():
  m, text = _readme_match(r"edit_rome_cpu\.json` \(`--num_edits=(\d+)`, the first \d+ "
                r"CounterFact records\) has (\d+) steady ROME edits \(prompt "
                r"shapes seen before\) at a median ([\d.]+) s \(([\d.]+) key, "
                r"([\d.]+) value, ([\d.]+) update\); the (\d+) edits that met a "
                r"new shape took ([\d.]+) s more", "ROME edit benchmark sentence")
  [r] = _load("benchmarks/edit_rome_cpu.json")["results"]
  assert int(m.group(1)) == r["num_edits"]
  assert int(m.group(2)) == r["steady_edits"]
  shown(m.group(3), r["steady_s"], "steady edit")
  for group, phase in zip(m.groups()[3:6], ("key", "value", "update")):
    shown(group, r["steady_phases_s"][phase], phase)
  assert int(m.group(7)) == r["edits_that_compiled"]
  shown(m.group(8), r["compile_s"], "compile")
  fresh = {row["process"]: row for row in r["fresh_processes"]}
  m = re.search(r"with an empty compilation cache the first edit takes "
                r"([\d.]+) s and edits 2-10 a median of ([\d.]+) s; with the "
                r"cache warm, ([\d.]+) s and ([\d.]+) s, and the first edit is "
                r"done ([\d.]+) s after the process starts \(([\d.]+) s", text)
  assert m, "the README's fresh-process sentence"
  for group, (process, key) in zip(m.groups(), (
      ("empty cache", "first_edit_s"), ("empty cache", "median_edits_2_to_n_s"),
      ("warm cache", "first_edit_s"), ("warm cache", "median_edits_2_to_n_s"),
      ("warm cache", "first_edit_done_since_start_s"),
      ("empty cache", "first_edit_done_since_start_s"))):
    shown(group, fresh[process][key], f"{process} {key}")


def test_readme_main_job_timings_match_their_json():
  m, _ = _readme_match(r"main_job_cpu\.json`\) prints an edit time of ([\d.]+) s on "
                r"its first run and ([\d.]+)-([\d.]+) s on later runs \((\d+) "
                r"runs; (\d+)-(\d+) s for the whole README command\)",
                    "main-job sentence")
  runs = _load("benchmarks/main_job_cpu.json")["runs"]
  warm = [r["edit_seconds"] for r in runs if r["compilation_cache"] == "warm"]
  first = [r["edit_seconds"] for r in runs if r["compilation_cache"] == "empty"
           and r["command"].startswith("python -m experiments.edit")]
  shown(m.group(1), first[0], "first run")
  shown(m.group(2), min(warm), "fastest warm run")
  shown(m.group(3), max(warm), "slowest warm run")
  assert int(m.group(4)) == len(warm)
  walls = [r["wall_s"] for r in runs if r["compilation_cache"] == "warm"
           and "wall_s" in r]
  assert (int(m.group(5)), int(m.group(6))) == (min(walls), max(walls))


def test_readme_scan_claim_matches_the_two_edit_benchmarks():
  m, _ = _readme_match(r"costs ([\d.]+) s more than a steady edit \(`docs/benchmarks/"
                r"edit_rome_cpu\.json`\), against ([\d.]+) s with the layers "
                r"unrolled \(`docs/benchmarks/(edit_rome_cpu_unrolled_\w+)"
                r"\.json`, the previous default\), and the steady edit is no "
                r"slower \(([\d.]+) s against ([\d.]+) s\)",
                    "scanned-layers sentence")
  [new] = _load("benchmarks/edit_rome_cpu.json")["results"]
  [old] = _load(f"benchmarks/{m.group(3)}.json")["results"]
  shown(m.group(1), new["compile_s"], "scanned compile")
  shown(m.group(2), old["compile_s"], "unrolled compile")
  shown(m.group(4), new["steady_s"], "scanned steady")
  shown(m.group(5), old["steady_s"], "unrolled steady")


def test_results_grace_paragraph_matches_its_jsons():
  """The GRACE paragraph's benchmark, sweep and removal numbers."""
  text = " ".join(_read(RESULTS_MD).split())
  bench = _load("benchmarks/forward_grace_cpu.json")["results"]
  without = [r["steady_s"] * 1e3 for r in bench if r["grace_entries"] == 0]
  with_ = [r["steady_s"] * 1e3 for r in bench if r["grace_entries"] == 1000]
  assert (f"takes {without[0]:.1f} and {without[1]:.1f} ms without a codebook "
          f"and {with_[0]:.1f} and {with_[1]:.1f} ms with 1,000 entries") in text
  removal = _load("results/grace_remove_cf100.json")
  assert {r["removed"] for r in removal["removals"]} == {0, 49, 99}
  assert all(r["max_abs_logit_diff_vs_unedited"] == 0.0 and
             r["others_sr"] == 100.0 for r in removal["removals"])
  sweep = _load("results/grace_sweep.json")["layers"]
  at = lambda f, k: [v["by_eps_factor"][f][k] for v in sweep.values()]
  assert set(at("0.05", "neighbourhood_hits_any_key")) == {0.0}
  assert set(at("0.05", "edit_prompt_hits_other_key")) == {0.0}
  assert set(at("0.1", "neighbourhood_hits_any_key")) == {0.01}
  hits = at("0.5", "neighbourhood_hits_any_key")
  assert f"at 0.5, {100 * min(hits):.0f}-{100 * max(hits):.0f}%" in text
  seq = _load("results/grace_seq100.json")
  assert seq["steps"][-1]["extras"]["codebook_size"] == 100
  assert (f"took {seq['timing']['edit_seconds_median']:.2f} s (median" in text)


def _rome_edit_summary(rel):
  """The numbers the README's AVX2 sentence quotes from one edit benchmark."""
  [r] = _load(rel)["results"]
  fresh = {row["process"]: row for row in r["fresh_processes"]}
  return {"rss": max([r["peak_rss_mb"]] + [f["peak_rss_mb"] for f in fresh.values()]),
          "compiled": r["edits_that_compiled"], "steady": r["steady_s"],
          "empty": statistics.median(fresh["empty cache"]["edit_s"]),
          "warm": statistics.median(fresh["warm cache"]["edit_s"])}


def test_readme_avx2_edit_benchmark_sentence_matches_its_jsons():
  m, _ = _readme_match(
      r"`docs/benchmarks/(edit_rome_avx2)\.json` against `docs/benchmarks/"
      r"(edit_rome_avx2_\w+)\.json`: peak RSS ([\d,]+) MiB against ([\d,]+) "
      r"\(the largest of the benchmark's three processes\); (\d+) of 10 edits "
      r"met a new prompt shape against (\d+); steady edits a median ([\d.]+) s "
      r"against ([\d.]+) s; in new processes all 10 edits a median ([\d.]+) s "
      r"with the compilation cache empty against ([\d.]+) s, and ([\d.]+) s "
      r"with it warm against ([\d.]+) s", "AVX2 edit benchmark sentence")
  new = _rome_edit_summary(f"benchmarks/{m.group(1)}.json")
  old = _rome_edit_summary(f"benchmarks/{m.group(2)}.json")
  groups = m.groups()[2:]
  for i, key in enumerate(("rss", "compiled", "steady", "empty", "warm")):
    for j, summary in enumerate((new, old)):
      cell = groups[2 * i + j]
      if key == "compiled":
        assert int(cell) == summary[key], (key, cell, summary[key])
      else:
        shown(cell.replace(",", ""), summary[key], f"{key} ({'new' if j == 0 else 'old'})")


def test_readme_vstar_bucket_and_memory_claims_match_their_jsons():
  m, text = _readme_match(r"(\d+) shapes cover the first ([\d,]+) CounterFact "
                          r"records, (\d+) did before", "v* bucket sentence")
  buckets = _load("benchmarks/vstar_buckets_avx2.json")
  assert int(m.group(1)) == buckets["sets"]["new"]["distinct_shapes"]
  assert int(m.group(2).replace(",", "")) == buckets["shape_records"]
  assert int(m.group(3)) == buckets["sets"]["old"]["distinct_shapes"]
  m = re.search(r"(\d+) MiB of temporary buffers in the loop instead of (\d+)", text)
  assert m, "the README's v* memory claim"
  mib = _load("benchmarks/vstar_memory_avx2.json")["mib"]
  shown(m.group(1), mib["float32"]["_optimize"]["temp"], "float32 temp")
  shown(m.group(2), mib["bfloat16"]["_optimize"]["temp"], "bfloat16 temp")


def test_readme_load_memory_claim_matches_its_json():
  m, _ = _readme_match(r"loading peaks at ([\d,]+) MiB against ([\d,]+), "
                       r"`docs/benchmarks/load_memory_avx2\.json`", "load memory claim")
  before, after = _load("benchmarks/load_memory_avx2.json")["runs"]
  shown(m.group(1).replace(",", ""), after["peak_rss_mib"], "load peak now")
  shown(m.group(2).replace(",", ""), before["peak_rss_mib"], "load peak before")


def test_readme_memit_continuous_batching_sentence_matches_its_json():
  m, _ = _readme_match(
      r"(\d+) of the first (\d+) CounterFact requests run all (\d+) steps.*?"
      r"`docs/benchmarks/memit_vstar_continuous_avx2\.json`: (\d+) slot-steps "
      r"in both modes, steady ([\d.]+) s against ([\d.]+) s chunked",
      "MEMIT continuous batching sentence")
  data = _load("benchmarks/memit_vstar_continuous_avx2.json")
  chunked, continuous = data["modes"]["chunked"], data["modes"]["continuous"]
  assert int(m.group(1)) == continuous["steps_histogram"][data["v_steps"] - 1]
  assert int(m.group(2)) == data["num_records"]
  assert int(m.group(3)) == data["v_steps"]
  assert int(m.group(4)) == chunked["slot_steps"] == continuous["slot_steps"]
  shown(m.group(5), continuous["steady_s"], "continuous steady")
  shown(m.group(6), chunked["steady_s"], "chunked steady")
  assert data["max_abs_delta_diff"] == 0.0


def test_results_tiny_rollback_sentence_matches_its_json():
  """The trained-tiny-model rollback counts and the seed-4 numbers."""
  text = " ".join(_read(RESULTS_MD).split())
  data = _load("results/rollback_tiny_seeds.json")
  seeds = data["seeds"]
  count = {mode: sum(r["modes"][mode]["meets_acceptance"]
                     for r in seeds.values()) for mode in ("subtract", "rebuild")}
  assert count == data["meets_acceptance"]
  assert (f"on {count['subtract']} of {len(seeds)} data seeds with subtract "
          f"and {count['rebuild']} of {len(seeds)} with rebuild") in text
  four = seeds["4"]
  after = {four["modes"][m]["rolled_back_p_new"]["after"]
           for m in ("subtract", "rebuild")}
  assert f"already at {four['pre_edit_p_new'][four['rolled_back']]:.1f} " \
         "points before its own edit" in text
  assert {f"{a:.1f}" for a in after} == {"67.3"} and "is at 67.3 after" in text
  five = seeds["5"]["modes"]
  assert [five[m]["others_success_held"] for m in ("subtract", "rebuild")] \
      == [80.0, 100.0] and five["subtract"]["others_succeeding_before"] == 5


def test_readme_manifest_size_sentence_matches_its_json():
  """The UltraEdit manifest sizes and verdict the README quotes."""
  text = " ".join(_read(os.path.join(ROOT, "README.md")).split())
  data = _load("benchmarks/manifest_ultraedit_cf32.json")
  assert data["verify_ok"] and data["operations"] == 4
  assert (f"declare {data['deltas_bytes'] / 1e6:.1f} MB against "
          f"{data['dense_bytes'] / 1e6:.1f} MB of dense changes") in text
