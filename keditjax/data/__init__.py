"""The datasets and corpora keditjax ships, and one way to name data.

Every loader in keditjax resolves its data argument here:

  - a **name** (`"counterfact"`, `"zsre"`, `"wikitext-2"`, ... see `names()`)
    is a file bundled in this package (gzip'd, with its PROVENANCE.txt and
    licence); when `$KEDITJAX_DATA` names a folder with the same layout
    (plain or `.gz` files), a file there is used instead of the bundled one;
  - an **explicit path** (anything that is not a bare name: it has a `/` or
    a `.`; write `./zsre` for a local file called `zsre`) always wins and is
    used as given; `.gz` files are read transparently;
  - **`hf:<id>[:<split>]`** is a Hugging Face dataset read with `datasets`:
    a directory written by `Dataset.save_to_disk` (or a dataset script or
    data-file directory) is loaded locally; a hub id needs network access,
    which is checked first, so an offline machine fails at once with a
    message saying so, without a hang or a partial cache.

Nothing here reads a folder outside the package unless the user names it.
The bundled files and their sources: `keditjax/data/README.md`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import socket
import urllib.parse
from typing import Any, Mapping

from keditjax import errors

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ENV_VAR = "KEDITJAX_DATA"


@dataclasses.dataclass(frozen=True)
class Entry:
  """A named dataset or corpus: where it lives under the data folder."""
  path: str          # relative to the data folder, without ".gz"
  kind: str          # "dataset" (records) or "corpus" (a folder of text)
  description: str


REGISTRY: dict[str, Entry] = {
    "counterfact": Entry("counterfact/counterfact-edit.json", "dataset",
                         "CounterFact edit split, 10,000 cases (flattened)"),
    "counterfact-train": Entry("counterfact/counterfact-train.json", "dataset",
                               "CounterFact training split, 10,000 cases"),
    "zsre": Entry("zsre/zsre_mend_eval_portability_gpt4.json", "dataset",
                  "zsRE eval, 1,037 records (MEND layout + portability)"),
    "zsre-train": Entry("zsre/zsre_mend_train-1k.json", "dataset",
                        "zsRE train, 1,000 records (MEND layout)"),
    "mquake": Entry("mquake/AKEW_MQuAKE-CF_subset.json", "dataset",
                    "MQuAKE-CF, a 354-case subset"),
    "known_1000": Entry("known_1000/known_1000.json", "dataset",
                        "ROME's known_1000 facts (causal tracing)"),
    "fever": Entry("fever/fever1.0_paper_dev.jsonl", "dataset",
                   "FEVER 1.0 paper_dev claims, 9,999"),
    "qaedit": Entry("qaedit/qaedit-1k-first700.json", "dataset",
                    "QAEdit (NQ/TriviaQA/SimpleQA questions), 700 records"),
    "wikitext-2": Entry("corpus/wikitext-2", "corpus",
                        "WikiText-2 (train tokens, valid/test raw)"),
}


def names(kind: str | None = None) -> list[str]:
  """The known dataset/corpus names (of one `kind`, or all)."""
  return sorted(n for n, e in REGISTRY.items() if kind in (None, e.kind))


def is_name(spec: str) -> bool:
  """Whether `spec` is a bare name (no path separator, no dot, no `hf:`)."""
  return (isinstance(spec, str) and bool(spec) and not spec.startswith("hf:")
          and "/" not in spec and os.sep not in spec and "." not in spec)


def _existing(base: str) -> str | None:
  for candidate in (base, base + ".gz"):
    if os.path.exists(candidate):
      return candidate
  return None


def path(spec: str, kind: str | None = None) -> str:
  """The local file or folder that `spec` names (see the module docstring).

  Args:
    spec: a name from `names()`, or a path (returned as given once it
      exists). `hf:` specs are not paths: use `read_records` / `load_hf`.
    kind: when set, a name must be of this kind ("dataset" or "corpus");
      paths are not checked.

  Raises:
    InputError: an unknown name (the known ones are listed), a name of the
      wrong kind, or a path that does not exist.
  """
  if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
    raise errors.InputError(f"data: expected a name or a path, got {spec!r}.")
  spec = os.fspath(spec)
  if spec.startswith("hf:"):
    raise errors.InputError(
        f"data {spec!r} is a Hugging Face dataset, not a local path.")
  if not is_name(spec):
    found = _existing(spec)
    if found is None:
      raise errors.InputError(f"data file {spec} does not exist.")
    return found
  entry = REGISTRY.get(spec)
  if entry is None:
    raise errors.InputError(
        f"unknown dataset {spec!r}; known: {', '.join(names())} (or pass a "
        "path, or 'hf:<id>').")
  if kind is not None and entry.kind != kind:
    raise errors.InputError(
        f"{spec!r} is a {entry.kind}, not a {kind}; {kind}s: "
        f"{', '.join(names(kind))}.")
  override = os.environ.get(ENV_VAR)
  if override:
    found = _existing(os.path.join(override, entry.path))
    if found is not None:
      return found
  found = _existing(os.path.join(PACKAGE_DIR, entry.path))
  if found is None:  # a broken install, not a user error
    raise errors.InputError(
        f"the bundled data file for {spec!r} ({entry.path}) is missing from "
        f"{PACKAGE_DIR}; reinstall keditjax or set ${ENV_VAR}.")
  return found


def open_text(file: str):
  """A text stream over `file`, decompressing `.gz` (UTF-8)."""
  if file.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(file, "rb"), encoding="utf-8",
                            errors="replace")
  return open(file, encoding="utf-8", errors="replace")


def open_bytes(file: str):
  """A binary stream over `file`'s (decompressed) content."""
  return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def stem(file: str) -> str:
  """`file` without a trailing `.gz` (what suffix checks should look at)."""
  return file[:-3] if file.endswith(".gz") else file


def read_json_file(file: str) -> Any:
  """The parsed content of a .json / .jsonl file (optionally gzip'd).

  Raises:
    InputError: the file is missing or not valid JSON (named).
  """
  if not os.path.isfile(file):
    raise errors.InputError(f"data file {file} does not exist or is not a "
                            "file.")
  with open_text(file) as f:
    text = f.read()
  try:
    if stem(file).endswith(".jsonl"):
      return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.InputError(f"{file} is not valid JSON: {e}.") from None


def read_records(spec: str) -> list:
  """The records of a dataset: a name, a path or `hf:<id>[:<split>]`.

  A JSON object is accepted as `{"data": [...]}` or `{id: record}`.

  Raises:
    InputError: unknown name, missing file, invalid JSON, no network for a
      hub dataset, or content that is not a list of records.
  """
  if isinstance(spec, str) and spec.startswith("hf:"):
    return list(load_hf(spec))
  file = path(spec, kind="dataset")
  rows = read_json_file(file)
  if isinstance(rows, Mapping):
    rows = rows.get("data", list(rows.values()))
  if not isinstance(rows, list):
    raise errors.InputError(f"{file}: expected a list of records.")
  return rows


# -- Hugging Face datasets ----------------------------------------------------


def _hub_endpoint() -> str:
  return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
  """Whether the Hugging Face hub answers a TCP connection (and why not).

  Honours `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` (then: not reachable).
  """
  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
      return False, f"{var} is set"
  url = urllib.parse.urlparse(_hub_endpoint())
  host = url.hostname or ""
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True, ""
  except OSError as e:
    return False, f"{host}:{port} is unreachable ({e})"


def _split_hf(spec: str) -> tuple[str, str | None, str]:
  """`hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT` -> parts."""
  parts = spec[3:].split(":")
  if not parts[0] or len(parts) > 3 or not all(parts):
    raise errors.InputError(
        f"{spec!r}: use 'hf:NAME', 'hf:NAME:SPLIT' or 'hf:NAME:CONFIG:SPLIT' "
        "(NAME: a hub id or a local directory).")
  if len(parts) == 1:
    return parts[0], None, "train"
  if len(parts) == 2:
    return parts[0], None, parts[1]
  return parts[0], parts[1], parts[2]


def load_hf(spec: str):
  """A `datasets.Dataset` named `hf:NAME[:CONFIG]:SPLIT`.

  `NAME` is a local directory (written by `save_to_disk`: loaded with
  `datasets.load_from_disk`, a `DatasetDict` indexed by SPLIT; otherwise
  `load_dataset(NAME)`) or a hub id (network checked first).

  Raises:
    InputError: bad spec, no network for a hub id, or `datasets` failing.
  """
  name, config, split = _split_hf(spec)
  import datasets  # heavy; only for hf: specs  pylint: disable=g-import-not-at-top
  if os.path.isdir(name):
    try:
      if os.path.exists(os.path.join(name, "dataset_info.json")) or (
          os.path.exists(os.path.join(name, "dataset_dict.json"))):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
          if split not in loaded:
            raise errors.InputError(
                f"{spec!r}: no split {split!r}; it has {sorted(loaded)}.")
          loaded = loaded[split]
        return loaded
      return datasets.load_dataset(name, config, split=split)
    except errors.InputError:
      raise
    except Exception as e:  # datasets raises many unrelated types
      raise errors.InputError(f"{spec!r}: cannot load ({e}).") from None
  ok, why = hub_reachable()
  if not ok:
    raise errors.InputError(
        f"{spec!r} is a Hugging Face hub dataset and this machine has no "
        f"network access to the hub ({why}). Use a bundled dataset "
        f"({', '.join(names('dataset'))}), a local file, or a directory saved "
        "with `datasets.Dataset.save_to_disk` ('hf:<dir>').")
  try:
    return datasets.load_dataset(name, config, split=split)
  except Exception as e:  # datasets raises many unrelated types
    raise errors.InputError(f"{spec!r}: cannot load ({e}).") from None
