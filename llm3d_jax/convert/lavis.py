"""Import of the released 3D-LLM checkpoints (LAVIS `Blip2T5`, `.pth`) without torch.

A released checkpoint is `torch.save({"model": state_dict, "optimizer": ..., "epoch": ...})`
(a bare state dict is accepted too) holding only what trained: LAVIS drops frozen weights
before saving. Its keys, and where they go in `llm3d_jax.model.llm3d` params:
  Qformer.bert.embeddings.LayerNorm.*           -> qformer/layernorm
  Qformer.bert.encoder.layer.<i>.(attention|crossattention).self.* / .output.*,
           intermediate_query.* / output_query.* -> qformer/layer_<i>/...   (see convert/qformer.py)
  query_tokens                                   -> qformer/query_tokens
  t5_proj.{weight,bias}                          -> proj/{kernel,bias}
  t5_model.shared.weight [len(tokenizer) + bins, d]
      rows [0, loc_offset)                       -> llm/shared[:loc_offset]
      rows [loc_offset, ...)                     -> llm/loc_embed  (the <loc> tokens)
  t5_model.lm_head.weight                        -> llm/lm_head[:, :loc_offset] and llm/loc_head
  t5_model.(encoder|decoder).embed_tokens.weight    tied copies of shared (checked, not used)
  t5_model.<anything else>                       -> llm/... by the T5 table (convert/t5.py)
  ln_vision.*, visual_encoder.*, Qformer.bert.embeddings.position_ids, Qformer.cls.*   dropped
The frozen rest (the T5 body) comes from the base HF BLIP-2 (FlanT5) directory. The Q-Former and
the projection must be complete in the checkpoint. The LAVIS Blip2T5 sets the T5 FFN activation to
exact GELU (`t5_config.dense_act_fn = "gelu"`), not FlanT5's tanh approximation: the imported
model does the same unless told otherwise.

Command line (checks a checkpoint and prints what it imports):
    python -m llm3d_jax.convert.lavis CHECKPOINT.pth --base BLIP2_DIR [--loc-offset N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np

from llm3d_jax.convert.blip2 import load_blip2
from llm3d_jax.convert.hf import apply_rules, transpose
from llm3d_jax.convert.pth import flatten, load_pth
from llm3d_jax.convert.qformer import lavis_qformer_rules
from llm3d_jax.convert.t5 import t5_rules
from llm3d_jax.fileio import InputError, cli_main
from llm3d_jax.model import llm3d

T5_PREFIX = "t5_model."
VOCAB_KEYS = tuple(
    T5_PREFIX + k
    for k in (
        "shared.weight",
        "lm_head.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
    )
)


def lavis_rules() -> list:
    """Mapping table LAVIS key -> llm3d param path (vocabulary rows are handled apart)."""
    t5 = [
        (rx, None if dst is None else "llm/" + dst, hook) for rx, dst, hook in t5_rules(T5_PREFIX)
    ]
    return [
        *lavis_qformer_rules(dst="qformer/"),
        (r"t5_proj\.weight", "proj/kernel", transpose),
        (r"t5_proj\.bias", "proj/bias", None),
        *t5,
        (r"(?:ln_vision|visual_encoder)\..*", None, None),
    ]


def read_lavis_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a LAVIS checkpoint's state dict (`{"model": ...}` unwrapped), flat keys."""
    path = os.fspath(path)
    obj = load_pth(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise InputError(path, "not a LAVIS checkpoint: expected a state dict or {'model': ...}")
    state = flatten(state)
    lacking = [k for k in ("query_tokens", "t5_proj.weight") if k not in state]
    if not any(k.startswith("Qformer.bert.") for k in state):
        lacking.append("Qformer.bert.*")
    if lacking:
        raise InputError(path, f"not a 3D-LLM LAVIS checkpoint: no {', '.join(lacking)}")
    return state


def _vocab_rows(state, key: str, loc_offset: int, d_model: int, path: str):
    rows = state[key]
    if rows.ndim != 2 or rows.shape[1] != d_model or rows.shape[0] <= loc_offset:
        raise InputError(
            path,
            f"shape mismatch for {key}: checkpoint {rows.shape} vs model "
            f"(loc_offset {loc_offset} + location rows, d_model {d_model})",
        )
    return rows[:loc_offset], rows[loc_offset:]


def from_lavis(
    path: str | os.PathLike,
    base: str | os.PathLike,
    loc_offset: int | None = None,
    t5_activation: str = "gelu",
    dtype: str = "float32",
):
    """(LLM3D module, params) = the base BLIP-2 directory overlaid with a LAVIS checkpoint.

    loc_offset: id of the first location token (= len(tokenizer) the checkpoint was trained
    with: 32100 for FlanT5); default: what the base directory's tokenizer gives, else the T5
    vocab size. The number of location tokens is the checkpoint's vocabulary rows - loc_offset.
    """

    path = os.fspath(path)
    state = read_lavis_state(path)
    module, params = load_blip2(base, dtype=dtype)
    cfg = module.config
    loc_offset = cfg.llm.loc_offset if loc_offset is None else int(loc_offset)
    if not 0 < loc_offset <= cfg.llm.vocab_size:
        raise InputError(
            path, f"loc_offset {loc_offset} outside the T5 vocabulary 1..{cfg.llm.vocab_size}"
        )
    loc_bins = cfg.llm.loc_bins
    vocab = {k: state.pop(k) for k in VOCAB_KEYS if k in state}
    params = apply_rules(
        state,
        lavis_rules(),
        params,
        source=path,
        allow_missing=[r"(?!qformer/|proj/).*"],  # the Q-Former and projection must be complete
    )
    llm = dict(params["llm"])
    d_model = cfg.llm.d_model
    shared_key = T5_PREFIX + "shared.weight"
    if shared_key in vocab:
        base_rows, loc_rows = _vocab_rows(vocab, shared_key, loc_offset, d_model, path)
        for key in VOCAB_KEYS[2:]:
            if key in vocab and not np.array_equal(vocab[key], vocab[shared_key]):
                raise InputError(path, f"{key} differs from {shared_key} (expected tied copies)")
        llm["shared"] = np.concatenate([base_rows, np.asarray(llm["shared"])[loc_offset:]])
        llm["loc_embed"] = loc_rows
        loc_bins = loc_rows.shape[0]
    head_key = T5_PREFIX + "lm_head.weight"
    if head_key in vocab:
        if "lm_head" not in llm:
            raise InputError(path, f"{head_key} present but the base T5 ties its head")
        head_rows, loc_head_rows = _vocab_rows(vocab, head_key, loc_offset, d_model, path)
        if loc_head_rows.shape[0] != loc_bins:
            raise InputError(
                path, f"{head_key} has {loc_head_rows.shape[0]} location rows, shared {loc_bins}"
            )
        head = np.asarray(llm["lm_head"]).copy()
        head[:, :loc_offset] = head_rows.T
        llm["lm_head"] = head
        llm["loc_head"] = np.ascontiguousarray(loc_head_rows.T)
    elif "lm_head" in llm and loc_bins != cfg.llm.loc_bins:
        raise InputError(path, f"{shared_key} brings new location rows but no {head_key}")
    params = {**params, "llm": llm}
    cfg = llm3d.with_overrides(cfg, loc_offset=loc_offset, loc_bins=loc_bins)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, activation=t5_activation))
    return llm3d.LLM3D(cfg), params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a released 3D-LLM (LAVIS) checkpoint.")
    parser.add_argument("checkpoint", help="LAVIS .pth file")
    parser.add_argument("--base", required=True, help="HF BLIP-2 (FlanT5) directory")
    parser.add_argument("--loc-offset", type=int, default=None, help="id of <loc0>")
    args = parser.parse_args(argv)
    module, params = from_lavis(args.checkpoint, args.base, loc_offset=args.loc_offset)
    cfg = module.config
    for group in ("qformer", "proj", "llm"):
        count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params[group]))
        print(f"{group:8s} {count / 1e6:10.3f} M parameters")
    print(
        f"location tokens: {cfg.llm.loc_bins} from id {cfg.llm.loc_offset}; "
        f"T5 activation {cfg.llm.activation}"
    )
    return 0


if __name__ == "__main__":
    cli_main(main)
