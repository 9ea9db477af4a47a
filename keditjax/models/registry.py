"""Per-architecture facts in one place: module, HF table, site -> parameter.

Adding an architecture means writing its module file with `HF_TABLE`,
`HF_IGNORE` and `SITE_PARAMS`, and adding one `Arch` row here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keditjax import errors
from keditjax.models import sites as sites_lib
from keditjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Arch:
  """What keditjax knows about one architecture.

  Attributes:
    module: the Flax module class, constructed as `module(config)`.
    hf_table: (HF name template, our path template, transform) rows; `{l}`
      stands for a layer index, transform is None or "T" (transpose).
    hf_ignore: regexes of HF tensors that are buffers, not parameters.
    site_params: site kind -> parameter path template (`{l}` = layer).
    apply_block: `(config, block_params, x, positions, mask, layer_cache,
      index) -> (x, cache)` for decoders (None for encoders).
    block_name: the parameter name of block `{l}` (e.g. "layers_{l}").
  """
  module: Any
  hf_table: tuple
  hf_ignore: tuple
  site_params: dict
  apply_block: Any = None
  block_name: str | None = None


def get_arch(arch: str) -> Arch:
  """The `Arch` row for `arch` ("llama", "gpt2", "gptj", "bert")."""
  # Imported lazily so that each architecture file may import this module.
  from keditjax.models import bert, gpt2, gptj, llama
  table = {
      "llama": Arch(llama.LlamaLM, llama.HF_TABLE, llama.HF_IGNORE,
                    llama.SITE_PARAMS, llama.apply_block, llama.BLOCK_NAME),
      "gpt2": Arch(gpt2.GPT2LM, gpt2.HF_TABLE, gpt2.HF_IGNORE,
                   gpt2.SITE_PARAMS, gpt2.apply_block, gpt2.BLOCK_NAME),
      "gptj": Arch(gptj.GPTJLM, gptj.HF_TABLE, gptj.HF_IGNORE,
                   gptj.SITE_PARAMS, gptj.apply_block, gptj.BLOCK_NAME),
      "bert": Arch(bert.BertEncoder, bert.HF_TABLE, bert.HF_IGNORE,
                   bert.SITE_PARAMS),
  }
  if arch not in table:
    raise errors.UnsupportedArchitectureError(
        f"Architecture {arch!r} is not implemented; available: {sorted(table)}.")
  return table[arch]


def site_param_path(config: ModelConfig, site: str) -> tuple[str, ...]:
  """The parameter leaf that site `site` writes, as a path tuple.

  `layer/{l}/mlp/value` -> the MLP output projection kernel, whose rows are
  indexed by `layer/{l}/mlp/key`: `value = key @ kernel (+ bias)`.

  Raises:
    SiteError: unknown site, or a site (`resid`) that no single leaf writes.
  """
  layer, kind = sites_lib.parse_site(site, config.num_layers)
  template = get_arch(config.arch).site_params.get(kind)
  if template is None:
    raise errors.SiteError(
        f"Site {site!r} is written by no single parameter leaf in "
        f"{config.arch}; sites with a leaf: "
        f"{sorted(get_arch(config.arch).site_params)}.")
  return tuple(part.format(l=layer) for part in template)
