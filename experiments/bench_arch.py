r"""What the architectural family's extra modules cost at inference.

`python -m experiments.benchmark --task=arch --arch_method=wise \
    --arch_edits=0,10,100,1000 --output_json=/tmp/arch_wise.json`

For one method (run each in its own process: the report's `peak_rss_mib` is
that process's peak) and each number of edits, builds the edited model with
that many synthetic entries and times greedy `model.generate` of
`--new_tokens` tokens after a `--prompt_tokens`-token WikiText-2 prompt at
each batch size. Synthetic entries cost what real ones do: the modules'
shapes, not their values, decide the work (every entry is read on every
token), and what the router decides is reported beside the latency:

  grace     N codebook entries (ε tiny: nothing hits, the lookup still reads
            every key).
  tpatcher  N × `max_neurons`/2 patch neurons (the CounterFact run averaged
            1.16 neurons per edit at the default max of 5; the benchmark uses
            the run's ratio, see `NEURONS_PER_EDIT`), keys random, bias
            negative (silent).
  wise      the side-memory shards the default schedule leaves after N edits
            (`wise.shards_after`: one per `save_freq` edits, merged into one
            retrievable shard every `merge_freq` edits, so 10 edits are 10
            shards, 100 are 100 and 1,000 are 1); thresholds finite so every
            shard's distance is computed.
  serac     N edit statements (CounterFact training split) in the memory;
            every prompt is embedded by MiniLM and scored against all N. The
            prompts are out of scope (`scope=out`: the base model answers the
            bare prompt); `scope=in` rows time prompts routed to the
            counterfactual model, which reads the template and the edit first
            (a longer prompt).

`added_params` counts the array elements the method adds (every leaf of the
edited pytree beyond the base params; capacity slots included, as they are
allocated); SERAC's are its classifier (384 × 384 + 2) and N × 384 memory
embeddings, besides the statements' text and the MiniLM
encoder it loads.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from keditjax import data
from keditjax.models import adapters

_METHOD = flags.DEFINE_enum("arch_method", "none",
                            ["none", "grace", "tpatcher", "wise", "serac"],
                            "arch: the method whose modules are timed.")
_EDITS = flags.DEFINE_list("arch_edits", ["0", "10", "100", "1000"],
                           "arch: numbers of edits.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 32, "arch: prompt length.")

# T-Patcher added 116 neurons for 100 CounterFact edits
# (docs/results/tpatcher_cf_seq100.json, extras "neurons").
NEURONS_PER_EDIT = 1.16


def _prompt(model, length: int) -> str:
  """A WikiText-2 passage that tokenises to `length` tokens."""
  from keditjax import stats  # pylint: disable=import-outside-toplevel
  texts = (t for t in stats.corpus_texts() if len(t.split()) > 2 * length)
  ids = model.encode(" ".join(next(texts).split()))[:length]
  return model.tokenizer.decode(list(ids))


def with_codebook(model, params, entries: int):
  """`params` plus a GRACE codebook of `entries` random live keys (ε small
  enough that nothing hits: the lookup costs the same either way)."""
  from keditjax.editors import grace  # pylint: disable=import-outside-toplevel
  if not entries:
    return params
  hp = grace.GraceHParams()
  rng = np.random.default_rng(1)
  book = grace.empty_codebook(entries, model.config.intermediate_size,
                              model.config.hidden_size, hp.replacement)
  p = dict(book.params, keys=jax.numpy.asarray(rng.normal(size=book.params["keys"].shape), "float32"),
           values=jax.numpy.asarray(rng.normal(size=book.params["values"].shape), "float32"),
           eps=jax.numpy.full((entries,), 1e-3, "float32"),
           active=jax.numpy.ones((entries,), "int32"))
  book = dataclasses.replace(book, params=p)
  return adapters.with_adapters(params, grace.site(hp), (book,))


def _grace(model, params, n):
  return with_codebook(model, params, n)


def _tpatcher(model, params, n):
  from keditjax.editors import tpatcher  # pylint: disable=import-outside-toplevel
  hp = tpatcher.TPatcherHParams()
  k = max(1, math.ceil(n * NEURONS_PER_EDIT))
  d = model.config.hidden_size
  patch = tpatcher.empty_patch(k, d, d, hp.activation)
  rng = np.random.default_rng(0)
  p = dict(patch.params,
           keys=jnp.asarray(rng.normal(size=(k, d)) / d, jnp.float32),
           bias=jnp.full((k,), -10.0, jnp.float32),
           values=jnp.asarray(rng.normal(size=(k, d)), jnp.float32),
           active=jnp.ones((k,), jnp.int32))
  patch = dataclasses.replace(patch, params=p)
  return adapters.with_adapters(params, tpatcher.site(hp), (patch,))


def _wise(model, params, n):
  from keditjax.editors import wise  # pylint: disable=import-outside-toplevel
  hp = wise.WiseHParams()
  s = wise.shards_after(n, hp)
  f, d = model.config.intermediate_size, model.config.hidden_size
  rng = np.random.default_rng(0)
  deltas = (rng.normal(size=(s, f, d)) * 1e-3).astype(np.float32)
  adapter = wise.wise_adapter(deltas, np.full((s,), 1e6, np.float32),
                              act=model.config.activation, router=hp.router)
  return adapters.with_adapters(params, wise.site(hp), (adapter,))


def _serac(model, params, n):
  from keditjax.editors import serac  # pylint: disable=import-outside-toplevel
  from keditjax.evaluation import cases as cases_lib  # pylint: disable=import-outside-toplevel
  path = cases_lib.default_path("counterfact-train")
  cases = []
  for record in data.read_records(path):
    if len(cases) == n:
      break
    try:
      cases += cases_lib.parse_cases([record], "counterfact", where=path)
    except Exception:  # pylint: disable=broad-except
      continue  # malformed training records are skipped, as in training
  editor = serac.serac()
  state = editor.init(model)
  edited, _, _ = editor.apply(model, params,
                              [c.requests[0] for c in cases], state)
  in_scope = [c.requests[0].text for c in cases]
  return edited, in_scope


def _count(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def bench_arch(model, params, measure, new_tokens: int, batches):
  """Rows of generate latency per (#edits, batch[, scope])."""
  method = _METHOD.value
  rows = []
  prompt = _prompt(model, _PROMPT.value)
  for n in map(int, _EDITS.value):
    in_scope = None
    if method == "none" or n == 0:
      p = params
    elif method == "serac":
      p, in_scope = _serac(model, params, n)
    else:
      p = {"grace": _grace, "tpatcher": _tpatcher,
           "wise": _wise}[method](model, params, n)
    added = _count(p) - _count(params)
    scopes = [("out", None)] + ([("in", in_scope)] if in_scope else [])
    for scope, texts in scopes:
      for batch in batches:
        prompts = ([prompt] * batch if texts is None else
                   [texts[i % len(texts)] for i in range(batch)])
        call = lambda: jax.block_until_ready(model.generate(
            p, prompts, new_tokens, stop_at_eos=False, return_ids=True))
        row = measure(call, batch * new_tokens)
        row.update(method=method, edits=n, batch=batch, scope=scope,
                   length=_PROMPT.value, new_tokens=new_tokens,
                   added_params=int(added),
                   ms_per_token=1e3 * row["steady_s"] / new_tokens)
        rows.append(row)
        print(f"{method} edits={n} batch={batch} scope={scope}: "
              f"{row['steady_s'] * 1e3:.1f} ms", flush=True)
  return rows
