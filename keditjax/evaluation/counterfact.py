"""CounterFact's probability-comparison scores (Meng et al. 2022, §3.2).

For a record edited to `target_new` (true answer `ground_truth`):

  - efficacy:      P(new) > P(true) on the edited prompt,
  - paraphrase:    P(new) > P(true) on the rephrased prompt,
  - neighborhood:  P(true) > P(new) on a prompt about a different subject
                   sharing the true answer (locality),

where each multi-token answer is scored by its mean per-token log-probability
given the prompt, as the ROME evaluation code does. Scores are percentages
of records; magnitudes are mean differences of those log-probabilities.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from keditjax import errors

FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
          "locality_prompt", "locality_ground_truth")


def load_records(path: str, limit: int | None = None) -> list[dict]:
  """Flattened CounterFact records (`../shared/data/counterfact` layout).

  Raises:
    InputError: a record misses a field (named with its index).
  """
  with open(path) as f:
    records = json.load(f)
  records = records[:limit] if limit else records
  for i, record in enumerate(records):
    missing = [k for k in FIELDS if not record.get(k)]
    if missing:
      raise errors.InputError(f"{path} record {i}: missing fields {missing}.")
  return records


def _space(text: str) -> str:
  return text if text.startswith(" ") else " " + text


def compare(model, params, prompts: Sequence[str], first: Sequence[str],
            second: Sequence[str], batch_size: int = 32) -> np.ndarray:
  """mean log p(first | prompt) - mean log p(second | prompt), per prompt."""
  n = len(prompts)
  lp = model.score(params, list(prompts) * 2,
                   [_space(t) for t in first] + [_space(t) for t in second],
                   reduction="mean", batch_size=batch_size)
  return lp[:n] - lp[n:]


def scores(model, params, records: Sequence[dict]) -> dict:
  """Per-record margins and the aggregate scores (percent) and magnitudes.

  Returns:
    {"efficacy_score", "paraphrase_score", "neighborhood_score",
     "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
     "per_record": {name: [margin, ...]}} where each margin is positive when
    the record passes.
  """
  new = [r["target_new"] for r in records]
  true = [r["ground_truth"] for r in records]
  margins = {
      "efficacy": compare(model, params, [r["prompt"] for r in records],
                          new, true),
      "paraphrase": compare(model, params,
                            [r["rephrase_prompt"] for r in records], new,
                            true),
      "neighborhood": compare(model, params,
                              [r["locality_prompt"] for r in records],
                              [r["locality_ground_truth"] for r in records],
                              new),
  }
  out = {}
  for name, m in margins.items():
    out[f"{name}_score"] = float(np.mean(m > 0) * 100)
    out[f"{name}_magnitude"] = float(np.mean(m))
  out["per_record"] = {k: v.tolist() for k, v in margins.items()}
  return out
