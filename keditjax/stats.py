"""Key second moments `E[k kᵀ]` over a text corpus, streamed and cached.

ROME (Meng et al. 2022, Eq. 2), MEMIT (Meng et al. 2023, Eq. 14) and
AlphaEdit (Fang et al. 2025, Sec. 3) weight their edits by the uncentred
second moment of the MLP keys at `layer/{l}/mlp/key`, estimated over a
generic corpus (ROME: `layer_stats.py`, WikiText). Here:

  - the corpus (default: the bundled WikiText-2 train split, `<unk>`
    dropped, headings skipped; any name, path or `hf:` spec of
    `keditjax.data`) is tokenized in chunks and *packed*: texts
    joined by a newline token and cut into rows of exactly `seq_len` tokens,
    so no compute is spent on padding (only the last row of the last batch is
    padded, and masked);
  - one jitted step runs the model only up to the highest requested layer
    (`lm.run(..., stop_layer=...)`), captures every requested layer's keys in
    that one pass and adds `Kᵀ K` to per-layer accumulators
    (`keditjax.kernels.covariance`); steps are dispatched asynchronously, so
    tokenizing the next batch overlaps the current one;
  - `compute_dtype="bfloat16"` runs the projections with bfloat16 inputs
    and float32 accumulation, ~1.6x faster on this CPU; on SmolLM2-135M
    layer 4 it moves `C` by 0.3% (Frobenius) and `C⁻¹k` by 0.7%, against
    34% and 67% between two disjoint 16k-token samples, so it is far below
    the estimate's own noise. The default, float32, is exact;
  - results are cached on disk, one file per layer, under a fingerprint of
    the weights the keys depend on, the layer, the tokenizer, the corpus
    content and the `Recipe` (`num_tokens`, `seq_len`, dtypes). Files are
    written atomically with a checksum; a corrupt or mismatched file is
    reported (a `UserWarning`) and recomputed, never used;
  - partial sums are checkpointed every `checkpoint_every_s` seconds and on
    interruption, so a killed run resumes where it stopped;
  - with several devices (or a given mesh), batches are split over the
    mesh's "data" axis (and weights placed by `keditjax.sharding` rules);
    XLA all-reduces the per-device `Kᵀ K`.

Packing means a row may span two paragraphs (attention crosses the newline
between them), as in LM pre-training; no BOS token is added, matching how
editors tokenize prompts (`Tokenizer.encode`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import time
import warnings
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from keditjax import data
from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.kernels import covariance
from keditjax.kernels.covariance import check_covariance  # re-exported
from keditjax.models import lm
from keditjax.models import precision
from keditjax.models import sites as sites_lib

DEFAULT_CORPUS = "wikitext-2"  # a `keditjax.data` name: bundled WikiText-2
# Bump when the text cleaning, packing or file layout changes: old cache
# files then stop matching instead of being misread.
FORMAT = "keditjax.stats/1"
TEXT_SUFFIXES = (".txt", ".text", ".tokens", ".raw")
_HEADING = re.compile(r"^(?:= )+.*(?: =)+$")  # WikiText " = = Title = = "
_UNK = re.compile(r"\s*<unk>")
_TOKENIZE_CHUNK = 512  # texts per `encode_batch` call
# 128-token rows give a key context like ROME's WikiText paragraphs (~130
# tokens) at half the attention cost of 256; 8 rows (1024 tokens) a step keep
# a step's activations in cache on a 2-core CPU (profiled: ~15% faster than
# 4096-token steps for SmolLM2-135M).
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8

log = logging.getLogger(__name__)


def site(layer: int) -> str:
  """The edit site whose second moment is computed: `layer/{l}/mlp/key`."""
  return f"layer/{layer}/mlp/key"


# -- corpus -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A resolved corpus.

  Attributes:
    description: human-readable origin (paths or dataset name).
    raw: a function returning a fresh iterator of raw texts (file lines or
      dataset rows), before cleaning.
    identify: a function returning `identity` (computed on first use: only
      caching needs it).
  """
  description: str
  raw: Any
  identify: Any

  @functools.cached_property
  def identity(self) -> str:
    """Hash of the content (files) or the `datasets` fingerprint."""
    return self.identify()

  def texts(self) -> Iterator[str]:
    """Cleaned paragraphs: `<unk>` dropped, blank lines and headings skipped."""
    for text in self.raw():
      for line in text.splitlines():
        line = _UNK.sub("", line).strip()
        if line and not _HEADING.match(line):
          yield line


def _file_digest(path: str) -> str:
  """sha256 of the (decompressed) content: a gzip'd copy keeps its key."""
  h = hashlib.sha256()
  with data.open_bytes(path) as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _read_lines(paths: Sequence[str]) -> Iterator[str]:
  for path in paths:
    with data.open_text(path) as f:
      yield from f


def _corpus_files(corpus) -> list[str]:
  """The text files a path, directory or list of paths names."""
  items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
  if not items:
    raise errors.InputError("corpus is an empty list of files.")
  files = []
  for item in items:
    item = os.fspath(item)
    if os.path.isdir(item):
      found = sorted(
          os.path.join(item, name) for name in os.listdir(item)
          if data.stem(name).endswith(TEXT_SUFFIXES)
          and os.path.isfile(os.path.join(item, name)))
      # A dataset directory with splits: statistics come from training text.
      train = [f for f in found if "train" in os.path.basename(f)]
      if not (train or found):
        raise errors.InputError(
            f"corpus directory {item!r} has no text files (suffixes "
            f"{TEXT_SUFFIXES}, optionally .gz).")
      files += train or found
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise errors.InputError(
          f"corpus {item!r} is neither a file nor a directory; pass text "
          "files, a directory of them, 'hf:<dataset>[:<config>]:<split>', or "
          "a `datasets.Dataset` with a 'text' column.")
  return files


def _dataset_corpus(dataset, description: str) -> Corpus:
  columns = getattr(dataset, "column_names", None) or []
  if "text" not in columns:
    raise errors.InputError(
        f"corpus {description}: a dataset needs a 'text' column; it has "
        f"{columns}.")
  fingerprint = getattr(dataset, "_fingerprint", None)
  if fingerprint is None:
    raise errors.InputError(
        f"corpus {description}: the dataset has no fingerprint to cache "
        "under; pass a map-style `datasets.Dataset`.")

  def raw():
    for batch in dataset.select_columns(["text"]).iter(batch_size=1000):
      yield from (t for t in batch["text"] if t)
  return Corpus(description, raw, lambda: f"datasets:{fingerprint}")


def resolve_corpus(corpus=None) -> Corpus:
  """Resolves a corpus argument (see `moments`) to a `Corpus`.

  Raises:
    InputError: the files do not exist or the dataset cannot be read.
  """
  if isinstance(corpus, Corpus):
    return corpus
  if corpus is None:
    corpus = DEFAULT_CORPUS
  if isinstance(corpus, str) and data.is_name(corpus):
    corpus = data.path(corpus, kind="corpus")
  if isinstance(corpus, str) and corpus.startswith("hf:"):
    # hf:NAME[:CONFIG]:SPLIT, a saved directory or a hub id (network checked)
    return _dataset_corpus(data.load_hf(corpus), corpus)
  if hasattr(corpus, "column_names"):  # a datasets.Dataset
    name = getattr(getattr(corpus, "info", None), "dataset_name", None)
    return _dataset_corpus(corpus, f"datasets.Dataset({name or ''})")
  files = _corpus_files(corpus)
  identify = lambda: "files:" + hashlib.sha256("\n".join(
      _file_digest(f) for f in files).encode()).hexdigest()
  return Corpus(", ".join(files), lambda: _read_lines(files), identify)


def corpus_texts(corpus=None) -> Iterator[str]:
  """The cleaned paragraphs of a corpus, in order.

  Args:
    corpus: None (the bundled WikiText-2 train split, `DEFAULT_CORPUS`), a
      `keditjax.data` corpus name, a text file (optionally .gz), a
      directory (its `TEXT_SUFFIXES` files; only those named `*train*` when
      there are any), a list of files, `"hf:NAME[:CONFIG]:SPLIT"` (a Hugging
      Face dataset with a "text" column) or a `datasets.Dataset`.

  Returns:
    An iterator of non-empty lines with `<unk>` removed and WikiText headings
    (`= Title =`) skipped.
  """
  return resolve_corpus(corpus).texts()


def _separator(tokenizer) -> list[int]:
  """Ids placed between packed texts: a newline, else EOS, else nothing."""
  ids = tokenizer.encode("\n")
  if ids:
    return list(ids)
  return [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]


def packed_rows(tokenizer, texts: Iterable[str], seq_len: int,
                num_tokens: int | None = None) -> Iterator[np.ndarray]:
  """Token rows of exactly `seq_len` ids (the last one may be shorter).

  Texts are tokenized in chunks (no special tokens), each followed by
  `_separator`, concatenated and cut into rows; the stream stops after
  `num_tokens` tokens (None: the whole corpus).

  Yields:
    int32 arrays `[n]`, `n == seq_len` except possibly for the last row.
  """
  sep = np.asarray(_separator(tokenizer), np.int32)
  budget = np.inf if num_tokens is None else num_tokens
  pending = np.zeros((0,), np.int32)
  texts = iter(texts)
  while budget > 0:
    chunk = list(itertools.islice(texts, _TOKENIZE_CHUNK))
    if chunk:
      ids = tokenizer.encode_batch(chunk)
      pieces = [pending]
      for row in ids:
        pieces += [np.asarray(row, np.int32), sep]
      pending = np.concatenate(pieces)
    usable = len(pending) if not chunk else len(pending) // seq_len * seq_len
    usable = int(min(usable, budget))
    for start in range(0, usable, seq_len):
      yield pending[start:min(start + seq_len, usable)]
    budget -= usable
    pending = pending[usable:]
    if not chunk:
      return


def _batches(rows: Iterator[np.ndarray], batch_size: int, seq_len: int,
             pad_id: int):
  """`(tokens_BxL, mask_BxL, real_rows)` batches, right-padded and masked."""
  while True:
    block = list(itertools.islice(rows, batch_size))
    if not block:
      return
    tokens = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for i, row in enumerate(block):
      tokens[i, :len(row)] = row
      mask[i, :len(row)] = 1
    yield tokens, mask, len(block)


# -- fingerprints -------------------------------------------------------------


_path_str = precision.path_str
_layer_of = precision.layer_of


def _leaf_digests(model, params, max_layer: int) -> dict[str, str]:
  """sha256 of each leaf's path, shape, dtype and bytes, up to `max_layer`."""
  digests = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _path_str(key_path)
    layer = _layer_of(path)
    if layer is not None and layer > max_layer:
      continue
    array = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{path}|{array.shape}|{array.dtype}|".encode())
    h.update(array.reshape(-1).view(np.uint8))
    digests[path] = h.hexdigest()
  return digests


def _layer_fingerprint(model, layer: int, digests: dict, common: str) -> str:
  """Hash of what `layer/{layer}/mlp/key` depends on, plus `common`.

  The keys of layer l are computed from the embeddings and blocks 0..l, but
  not from layer l's MLP output projection (which they feed): editing that
  (ROME, MEMIT) keeps the cache valid. Leaves above l are skipped; leaves
  with no layer index (embeddings, final norm, head) are always included.
  """
  out_proj = "/".join(model.site_param(f"layer/{layer}/mlp/value")[:-1]) + "/"
  h = hashlib.sha256(f"{common}|{site(layer)}".encode())
  for path in sorted(digests):
    leaf_layer = _layer_of(path)
    if leaf_layer is not None and (leaf_layer > layer or (
        leaf_layer == layer and path.startswith(out_proj))):
      continue
    h.update(f"{path}={digests[path]};".encode())
  return h.hexdigest()


def _tokenizer_identity(tokenizer) -> str:
  backend = getattr(tokenizer, "backend", None)
  text = backend.to_str() if hasattr(backend, "to_str") else repr(tokenizer)
  extra = f"|eos={tokenizer.eos_id}|pad={tokenizer.pad_id}"
  return hashlib.sha256((text + extra).encode()).hexdigest()


def fingerprints(model, layers, *, params=None, corpus=None,
                 **recipe) -> dict[int, str]:
  """The cache key of each layer's statistics.

  Args:
    model, layers, params, corpus: as in `moments`.
    **recipe: `Recipe` fields (`num_tokens`, `seq_len`, `dtype`,
      `compute_dtype`), defaults as in `moments`.

  Returns:
    `{layer: hex sha256}`; equal keys mean equal inputs to the computation.
  """
  layers = _check_layers(model, layers)
  return _fingerprints(model, layers, model.params if params is None
                       else params, resolve_corpus(corpus),
                       Recipe(**recipe).normalized())


def _fingerprints(model, layers, params, corpus: Corpus,
                  recipe: "Recipe") -> dict[int, str]:
  common = json.dumps({
      "format": FORMAT, "config": repr(model.config),
      "tokenizer": _tokenizer_identity(model.tokenizer),
      "corpus": corpus.identity, **dataclasses.asdict(recipe)},
      sort_keys=True)
  digests = _leaf_digests(model, params, max(layers))
  return {l: _layer_fingerprint(model, l, digests, common) for l in layers}


# -- cache files --------------------------------------------------------------


def default_cache_dir() -> str:
  """`$KEDITJAX_CACHE/stats`, else `~/.cache/keditjax/stats`."""
  root = os.environ.get("KEDITJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "keditjax")
  return os.path.join(root, "stats")


def _checksum(arrays: dict, meta: dict) -> str:
  h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    h.update(f"{name}|{array.shape}|{array.dtype}|".encode())
    h.update(array.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _write_atomic(path: str, arrays: dict, meta: dict) -> bool:
  """Writes an `.npz` with a checksummed `meta` entry, via tmp + rename.

  A reader sees the old file or the complete new one, never a torn write.
  Returns False (with a warning) if the file cannot be written: the caller's
  result stays valid, it just is not cached.
  """
  meta = dict(meta, checksum=_checksum(arrays, meta))
  buffer = io.BytesIO()
  np.savez(buffer, meta=np.asarray(json.dumps(meta, sort_keys=True)),
           **arrays)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "wb") as f:
      f.write(buffer.getbuffer())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    return True
  except OSError as e:
    warnings.warn(f"keditjax.stats: cannot write cache file {path} ({e}).",
                  stacklevel=3)
    return False
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _read_verified(path: str, expect: dict):
  """`(arrays, meta)` of a cache file, or None (with a warning) if unusable.

  A file is used only if it parses, its checksum matches its content and its
  meta has every `expect`ed value (the fingerprint among them).
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {name: data[name] for name in data.files if name != "meta"}
      meta = json.loads(str(data["meta"]))
    checksum = meta.pop("checksum")
    if checksum != _checksum(arrays, meta):
      raise ValueError("checksum mismatch")
    for key, value in expect.items():
      if meta.get(key) != value:
        raise ValueError(f"{key} is {meta.get(key)!r}, expected {value!r}")
  except Exception as e:  # any way a file can be broken: recompute
    warnings.warn(f"keditjax.stats: ignoring corrupt or mismatched cache file "
                  f"{path} ({type(e).__name__}: {e}); recomputing.",
                  stacklevel=3)
    return None
  return arrays, meta


def _layer_path(cache_dir: str, layer: int, fingerprint: str) -> str:
  return os.path.join(cache_dir, f"mom2-layer{layer}-{fingerprint[:32]}.npz")


# -- computation --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything besides weights and corpus that changes the statistic.

  Attributes:
    num_tokens: tokens to accumulate; None for the whole corpus.
    seq_len: packed row length.
    dtype: accumulator dtype, "float32" or "float64".
    compute_dtype: "float32" (exact) or "bfloat16": every `nn.Dense`
      projection multiplies bfloat16-rounded inputs and weights with float32
      accumulation (~1.6x faster on a 2-core AVX512-BF16 CPU; MEMIT
      likewise gathers GPT-J statistics in float16). Norms, attention, the
      MLP non-linearity and `Kᵀ K` stay float32. See the module docstring
      for its error.
  """
  num_tokens: int | None = None
  seq_len: int = DEFAULT_SEQ_LEN
  dtype: str = "float32"
  compute_dtype: str = "float32"

  def normalized(self) -> "Recipe":
    """Plain ints and strs (NumPy scalars or dtypes hash differently)."""
    return Recipe(None if self.num_tokens is None else int(self.num_tokens),
                  int(self.seq_len), _dtype_name(self.dtype),
                  _dtype_name(self.compute_dtype))


def _dtype_name(dtype) -> str:
  """"float32" for np.float32, jnp.float32, "float32", ...; else str()."""
  try:
    return np.dtype(dtype).name
  except TypeError:
    return str(dtype)


COMPUTE_DTYPES = precision.COMPUTE_DTYPES


@dataclasses.dataclass(frozen=True, eq=False)
class Moments:
  """The second moment of one layer's keys.

  Attributes:
    layer: the layer (site `layer/{layer}/mlp/key`).
    mom2: `E[k kᵀ] = Σ k kᵀ / count`, NumPy `[F, F]` of the accumulator dtype.
    count: tokens accumulated.
    fingerprint: the cache key (see `fingerprints`); None without a cache.
    path: the cache file, or None when caching is off.
  """
  layer: int
  mom2: np.ndarray
  count: int
  fingerprint: str | None
  path: str | None = None


@functools.partial(jax.jit, static_argnames=("config", "layers", "mesh",
                                             "compute_dtype"),
                   donate_argnums=(0,))
def _accumulate_step(sums, params, tokens_BxL, mask_BxL, *, config, layers,
                     mesh, compute_dtype="float32"):
  """Adds one batch's `Kᵀ K` at every layer in `layers` (one partial pass)."""
  with precision.compute_dtype(compute_dtype):  # an explicit stop: no LM head
    _, out, _ = lm.run(config, params, tokens_BxL, attention_mask=mask_BxL,
                       stop_layer=max(layers) + 1,
                       sites=sites_lib.capture(*map(site, layers)))
  mask_N = mask_BxL.reshape(-1)
  new = []
  for mom2_FxF, layer in zip(sums, layers):
    keys_NxF = out[site(layer)].reshape(mask_N.shape[0], -1)
    batch_FxF = covariance.outer_sum(keys_NxF, mask_N, mom2_FxF.dtype)
    if mesh is not None:  # all-reduce over "data", keep it replicated
      batch_FxF = jax.lax.with_sharding_constraint(
          batch_FxF, NamedSharding(mesh, P()))
    new.append(mom2_FxF + batch_FxF)
  return tuple(new), jnp.sum(mask_N)


def _check_layers(model, layers) -> tuple[int, ...]:
  config = getattr(model, "config", None)
  if config is None or not config.is_decoder:
    raise errors.ConfigError(
        f"model must be a decoder LanguageModel; got {type(model).__name__}"
        f"{'' if config is None else ' (' + config.arch + ')'}.")
  items = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
  if not items:
    raise errors.ConfigError("layers is empty; name at least one layer.")
  for layer in items:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) \
        or not 0 <= layer < config.num_layers:
      raise errors.ConfigError(
          f"layer {layer!r} is not a layer of this model; valid layers are "
          f"0..{config.num_layers - 1}.")
  return tuple(sorted({int(l) for l in items}))


def _check_args(model, recipe: Recipe, batch_size, mesh,
                checkpoint_every_s) -> None:
  if model.tokenizer is None:
    raise errors.TokenizerError(
        f"{model!r} has no tokenizer; corpus statistics need one.")
  num_tokens, seq_len = recipe.num_tokens, recipe.seq_len
  if num_tokens is not None and (not isinstance(num_tokens, (int, np.integer))
                                 or num_tokens < 1):
    raise errors.ConfigError(
        f"num_tokens={num_tokens!r}; use a positive int, or None for the "
        "whole corpus.")
  limit = model.config.max_position_embeddings
  if not isinstance(seq_len, (int, np.integer)) or not 1 <= seq_len <= limit:
    raise errors.ConfigError(
        f"seq_len={seq_len!r}; use an int in 1..{limit} "
        "(max_position_embeddings).")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise errors.ConfigError(f"batch_size={batch_size!r}; use an int >= 1.")
  if recipe.dtype not in covariance.ACCUMULATOR_DTYPES:
    raise errors.ConfigError(
        f"dtype={recipe.dtype!r}; use one of {covariance.ACCUMULATOR_DTYPES}.")
  if recipe.compute_dtype not in COMPUTE_DTYPES:
    raise errors.ConfigError(
        f"compute_dtype={recipe.compute_dtype!r}; use one of "
        f"{COMPUTE_DTYPES}.")
  if mesh is not None:
    if not hasattr(mesh, "shape") or "data" not in mesh.shape:
      raise errors.ConfigError(
          f"mesh={mesh!r} has no 'data' axis; pass 'auto', None or a "
          "keditjax.sharding.make_mesh mesh.")
    if batch_size % mesh.shape["data"]:
      raise errors.ConfigError(
          f"batch_size={batch_size} is not a multiple of the mesh's data "
          f"axis ({mesh.shape['data']}).")
  if checkpoint_every_s < 0:
    raise errors.ConfigError(
        f"checkpoint_every_s={checkpoint_every_s}; use a value >= 0.")


def moments(model, layers, *, params=None, corpus=None,
            num_tokens: int | None = None, seq_len: int = DEFAULT_SEQ_LEN,
            batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32",
            compute_dtype: str = "float32",
            cache_dir: str | None | bool = None, progress: bool = True,
            mesh="auto", checkpoint_every_s: float = 60.0
            ) -> dict[int, Moments]:
  """Second moments `E[k kᵀ]` of the MLP keys of `layers`, with metadata.

  Args:
    model: a decoder `LanguageModel` (config, tokenizer, params).
    layers: a layer index or a sequence of them; all are captured in one
      partial forward pass up to the highest.
    params: the weights to use (default `model.params`), e.g. an edited copy.
    corpus: None (WikiText-2 train), text file(s), a directory,
      `"hf:NAME[:CONFIG]:SPLIT"` or a `datasets.Dataset`; see `corpus_texts`.
    num_tokens: tokens to accumulate (ROME's `mom2_n_samples`, in tokens);
      None for the whole corpus. Fewer are used if the corpus is shorter.
    seq_len: packed row length (the context of a key is its row so far).
    batch_size: rows per step (a multiple of a given mesh's data axis).
    dtype: accumulator dtype, "float32" or "float64" (ROME's `mom2_dtype`;
      float64 runs the step under `jax.enable_x64`).
    compute_dtype: "float32" or "bfloat16" projections (see `Recipe`).
    cache_dir: where results and checkpoints live (None: `default_cache_dir`;
      False: no caching, no resuming).
    progress: show a tqdm bar (tokens/s).
    mesh: a `keditjax.sharding.make_mesh` mesh: batches are split over
      "data" and weights placed by the sharding rules. "auto": every device
      on the data axis when there are several (`batch_size` rounded up to a
      multiple of their number), else none. None: one device.
    checkpoint_every_s: seconds between checkpoints of the partial sums (0:
      after every batch); an exception or Ctrl-C also saves them.

  Returns:
    `{layer: Moments}`, in increasing layer order.

  Raises:
    ConfigError: a bad layer (naming the valid range), size, dtype or mesh.
    TokenizerError: the model has no tokenizer.
    InputError: the corpus is missing or yields no tokens.
  """
  layers = _check_layers(model, layers)
  if isinstance(mesh, str) and mesh == "auto":
    mesh = None
    if jax.device_count() > 1 and isinstance(batch_size, int):
      from keditjax import sharding
      mesh = sharding.make_mesh()
      batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  recipe = Recipe(num_tokens, seq_len, _dtype_name(dtype),
                  _dtype_name(compute_dtype))
  _check_args(model, recipe, batch_size, mesh, checkpoint_every_s)
  recipe = recipe.normalized()
  corpus = resolve_corpus(corpus)
  params = model.params if params is None else params
  if cache_dir is None or cache_dir is True:
    cache_dir = default_cache_dir()
  if cache_dir:
    fps = _fingerprints(model, layers, params, corpus, recipe)
  else:  # nothing to look up: skip hashing the weights
    fps = dict.fromkeys(layers)
  results, todo = {}, []
  for layer in layers:
    path = cache_dir and _layer_path(cache_dir, layer, fps[layer])
    cached = path and _read_verified(path, {"fingerprint": fps[layer]})
    if cached:
      arrays, meta = cached
      results[layer] = Moments(layer, covariance.finalize(
          arrays["mom2_sum"], meta["count"]), meta["count"], fps[layer], path)
    else:
      todo.append(layer)
  if todo:
    sums, count = _compute(model, tuple(todo), params, corpus, fps, recipe,
                           batch_size, cache_dir or None, progress, mesh,
                           checkpoint_every_s)
    for layer, mom2_sum in zip(todo, sums):
      path = None
      if cache_dir:
        path = _layer_path(cache_dir, layer, fps[layer])
        if not _write_atomic(path, {"mom2_sum": mom2_sum}, {
            "fingerprint": fps[layer], "count": count, "layer": layer,
            "site": site(layer), "model": getattr(model, "name", ""),
            "corpus": corpus.description, **dataclasses.asdict(recipe)}):
          path = None
      results[layer] = Moments(layer, covariance.finalize(mom2_sum, count),
                               count, fps[layer], path)
  return {layer: results[layer] for layer in layers}


def second_moments(model, layers, **kwargs) -> dict[int, np.ndarray]:
  """`{layer: E[k kᵀ]}` (`[F, F]` NumPy); arguments as in `moments`."""
  return {layer: m.mom2 for layer, m in moments(model, layers,
                                                **kwargs).items()}


class _State(NamedTuple):
  """Accumulators and position, committed together by one assignment."""
  sums: tuple       # per-layer Σ k kᵀ (device arrays)
  count: int        # tokens accumulated
  rows_done: int    # packed rows consumed (where a resumed run starts)


def _compute(model, layers, params, corpus, fps, recipe: Recipe, batch_size,
             cache_dir, progress, mesh, checkpoint_every_s):
  """Streams the corpus through `_accumulate_step`; returns (sums, count)."""
  config, features = model.config, model.config.intermediate_size
  dtype, seq_len, num_tokens = recipe.dtype, recipe.seq_len, recipe.num_tokens
  run_fp = partial = resumed = None
  if cache_dir:
    run_fp = hashlib.sha256("|".join(fps[l] for l in layers).encode())
    run_fp = run_fp.hexdigest()
    partial = os.path.join(cache_dir, f"partial-{run_fp[:32]}.npz")
    resumed = _read_verified(partial, {"fingerprint": run_fp})
  if resumed:
    arrays, meta = resumed
    host_sums = [arrays[f"mom2_sum_{l}"] for l in layers]
    count, rows_done = meta["count"], meta["rows_done"]
    log.info("resuming %s after %d tokens", partial, count)
  else:
    host_sums = [np.zeros((features, features), dtype) for _ in layers]
    count, rows_done = 0, 0
  rows = packed_rows(model.tokenizer, corpus.texts(), seq_len, num_tokens)
  batches = _batches(itertools.islice(rows, rows_done, None), batch_size,
                     seq_len, model.tokenizer.pad_id or 0)
  first = next(batches, None)  # an empty corpus fails before any compile
  if first is None and not resumed:
    raise errors.InputError(f"corpus {corpus.description} yields no tokens.")
  batches = itertools.chain([first] if first else [], batches)

  if recipe.compute_dtype == "bfloat16":
    params = precision.cast_kernels(params, max_layer=max(layers))
  if mesh is not None:
    from keditjax import sharding
    params = sharding.shard_params(params, mesh)
    put_batch = lambda x: jax.device_put(x, sharding.data_sharding(mesh, 2))
    put_sum = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
  else:
    params = jax.device_put(params)
    put_batch = put_sum = jax.device_put

  def save(state):
    arrays = {f"mom2_sum_{l}": np.asarray(s)
              for l, s in zip(layers, jax.device_get(state.sums))}
    _write_atomic(partial, arrays, {"fingerprint": run_fp,
                                    "count": state.count,
                                    "rows_done": state.rows_done})

  bar = None
  if progress:
    bar = progress_lib.bar(total=num_tokens, initial=count, unit="tok", unit_scale=True,
               desc=f"E[kk^T] layers {','.join(map(str, layers))}")
  x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
  with x64:
    state = _State(tuple(put_sum(np.asarray(s, dtype)) for s in host_sums),
                   count, rows_done)
    saved = state
    in_flight = collections.deque()  # bounds how far dispatch runs ahead
    saved_at = time.monotonic()
    try:
      for tokens_BxL, mask_BxL, real in batches:
        if len(in_flight) >= 2:
          in_flight.popleft().block_until_ready()
        tokens = int(mask_BxL.sum())
        sums, done_N = _accumulate_step(
            state.sums, params, put_batch(tokens_BxL), put_batch(mask_BxL),
            config=config, layers=layers, mesh=mesh,
            compute_dtype=recipe.compute_dtype)
        # One assignment commits the batch: an interrupt leaves the old state
        # (its sums donated, so unsaveable) or the new one, never a mix.
        state = _State(sums, state.count + tokens, state.rows_done + real)
        in_flight.append(done_N)
        if bar is not None:
          bar.update(tokens)
        if partial and time.monotonic() - saved_at >= checkpoint_every_s:
          save(state)
          saved, saved_at = state, time.monotonic()
    except BaseException:
      if partial and state is not saved:
        with contextlib.suppress(Exception):
          save(state)  # what completed so far; a rerun resumes from it
      raise
    finally:
      if bar is not None:
        bar.close()
    host_sums = [np.asarray(s) for s in jax.device_get(state.sums)]
  if num_tokens is not None and state.count < num_tokens:
    log.warning("corpus %s has only %d of the %d tokens requested.",
                corpus.description, state.count, num_tokens)
  if partial and os.path.exists(partial):
    os.remove(partial)
  return host_sums, state.count
