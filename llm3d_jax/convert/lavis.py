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

Optimizer state. LAVIS's runner saves `optimizer.state_dict()` of a torch AdamW with two param
groups built from `model.named_parameters()` (trainable ones, in module order): first those it
decays, then the rest (1-D tensors and names holding "bias", "ln" or "bn"). The state is keyed by
the parameter's number in that order (group 0's first, then group 1's) and holds `step`,
`exp_avg` and `exp_avg_sq`; parameters that never had a gradient (ln_vision) have none. The saved
state dict lists the same parameters in the same module order (plus buffers such as
`position_ids`, and the T5 embedding under its tied names, one parameter), so the numbering is
rebuilt from it and checked against the group sizes and every tensor's shape.
`from_lavis(..., with_optimizer=True)` maps `exp_avg` and `exp_avg_sq` through the same table as
the weights (`LavisMoments`: mu, nu in params layout, zero where there is no state) and the
common `step` to a count.

Command line (checks a checkpoint and prints what it imports):
    python -m llm3d_jax.convert.lavis CHECKPOINT.pth --base BLIP2_DIR [--loc-offset N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re

import jax
import numpy as np
from flax import traverse_util

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


def read_lavis_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], object]:
    """-> (the tensors of the checkpoint's state dict, flat keys in saved order; its "optimizer"
    entry, None when absent). `{"model": ...}` is unwrapped; a bare state dict has no optimizer."""
    path = os.fspath(path)
    obj = load_pth(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise InputError(path, "not a LAVIS checkpoint: expected a state dict or {'model': ...}")
    optimizer = obj.get("optimizer") if state is not obj else None
    state = flatten(state)
    lacking = [k for k in ("query_tokens", "t5_proj.weight") if k not in state]
    if not any(k.startswith("Qformer.bert.") for k in state):
        lacking.append("Qformer.bert.*")
    if lacking:
        raise InputError(path, f"not a 3D-LLM LAVIS checkpoint: no {', '.join(lacking)}")
    return state, optimizer


def read_lavis_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a LAVIS checkpoint's state dict (`{"model": ...}` unwrapped), flat keys."""
    return read_lavis_checkpoint(path)[0]


def _vocab_rows(state, key: str, loc_offset: int, d_model: int, path: str):
    rows = state[key]
    if rows.ndim != 2 or rows.shape[1] != d_model or rows.shape[0] <= loc_offset:
        raise InputError(
            path,
            f"shape mismatch for {key}: checkpoint {rows.shape} vs model "
            f"(loc_offset {loc_offset} + location rows, d_model {d_model})",
        )
    return rows[:loc_offset], rows[loc_offset:]


def _overlay(
    tensors: dict, target: dict, cfg, loc_offset: int, path: str, allow_missing=(), sparse=False
):
    """LAVIS-named tensors onto `target`, a params tree of the model `cfg` -> (params, number
    of location rows). `sparse`: the tensors are optimizer moments in the weights' layout; the
    result holds only the params they reach (vocabulary rows they do not cover are 0)."""
    tensors = dict(tensors)
    vocab = {k: tensors.pop(k) for k in VOCAB_KEYS if k in tensors}
    params = apply_rules(
        tensors,
        lavis_rules(),
        target,
        source=path,
        allow_missing=[".*"] if sparse else allow_missing,
        fill_missing=not sparse,
    )
    llm = dict(params.get("llm", {}))
    rest = lambda key: (
        np.zeros(np.shape(target["llm"][key]), np.float32) if sparse else np.asarray(llm[key])
    )
    d_model = cfg.llm.d_model
    loc_bins = cfg.llm.loc_bins
    shared_key = T5_PREFIX + "shared.weight"
    if shared_key in vocab:
        base_rows, loc_rows = _vocab_rows(vocab, shared_key, loc_offset, d_model, path)
        for key in VOCAB_KEYS[2:]:
            if key in vocab and not np.array_equal(vocab[key], vocab[shared_key]):
                raise InputError(path, f"{key} differs from {shared_key} (expected tied copies)")
        llm["shared"] = np.concatenate([base_rows, rest("shared")[loc_offset:]])
        llm["loc_embed"] = loc_rows
        loc_bins = loc_rows.shape[0]
    head_key = T5_PREFIX + "lm_head.weight"
    if head_key in vocab:
        if "lm_head" not in target["llm"]:
            raise InputError(path, f"{head_key} present but the base T5 ties its head")
        head_rows, loc_head_rows = _vocab_rows(vocab, head_key, loc_offset, d_model, path)
        if loc_head_rows.shape[0] != loc_bins:
            raise InputError(
                path, f"{head_key} has {loc_head_rows.shape[0]} location rows, shared {loc_bins}"
            )
        head = rest("lm_head").copy()
        head[:, :loc_offset] = head_rows.T
        llm["lm_head"] = head
        llm["loc_head"] = np.ascontiguousarray(loc_head_rows.T)
    elif "lm_head" in target["llm"] and loc_bins != cfg.llm.loc_bins:
        raise InputError(path, f"{shared_key} brings new location rows but no {head_key}")
    return ({**params, "llm": llm} if llm else params), loc_bins


@dataclasses.dataclass(frozen=True)
class LavisMoments:
    """A LAVIS checkpoint's AdamW state in the layout of the imported params.

    mu / nu: the params' tree restricted to the params the state reaches (`covered`, "/"-joined
    paths), torch `exp_avg` / `exp_avg_sq` through the weights' mapping table (vocabulary rows
    without state are 0); every other param has no state, i.e. zero moments. count: the common
    torch `step`; groups: each param group's lr, betas, eps, weight_decay and size as saved."""

    mu: dict
    nu: dict
    count: int
    covered: tuple[str, ...]
    groups: tuple[dict, ...]


def lavis_parameter_groups(state: dict[str, np.ndarray], num_groups: int) -> list[list[str]]:
    """The names LAVIS's AdamW numbers, per param group, rebuilt from the saved state dict:
    its parameters in module order (buffers and the tied copies of the T5 embedding left out),
    split as `RunnerBase.optimizer` splits them when there are two groups."""
    names = [
        k for k in state if k not in VOCAB_KEYS[2:] and not re.fullmatch(r".*\.position_ids", k)
    ]
    if num_groups == 1:
        return [names]
    no_decay = lambda n: state[n].ndim < 2 or any(s in n for s in ("bias", "ln", "bn"))
    return [[n for n in names if not no_decay(n)], [n for n in names if no_decay(n)]]


def _step_count(value, name: str, path: str) -> int:
    step = np.asarray(value)
    if step.shape != () or step.dtype.kind not in "iuf":
        raise InputError(path, f"optimizer: step of {name} is not a number")
    step = float(step)
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise InputError(path, f"optimizer: step of {name} is {step}, not a count")
    return int(step)


def lavis_optimizer_state(state: dict[str, np.ndarray], optimizer, path: str):
    """A torch AdamW `state_dict()` saved beside `state` -> ({LAVIS name: (exp_avg, exp_avg_sq)},
    step, groups' hyperparameters). Anything that does not fit is one InputError naming `path`."""
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), (list, tuple))
    ):
        raise InputError(path, "optimizer: not a torch optimizer state_dict (state, param_groups)")
    groups = list(optimizer["param_groups"])
    ids = []
    for group in groups:
        numbers = group.get("params") if isinstance(group, dict) else None
        if not isinstance(numbers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in numbers
        ):
            raise InputError(path, "optimizer: a param group without a list of parameter ids")
        if group.get("amsgrad"):
            raise InputError(path, "optimizer: AMSGrad state is not supported (optax adamw)")
        ids.append(list(numbers))
    if len(groups) not in (1, 2):
        raise InputError(
            path, f"optimizer: {len(groups)} param groups (LAVIS saves 2: decayed, not decayed)"
        )
    names = lavis_parameter_groups(state, len(groups))
    if [len(i) for i in ids] != [len(n) for n in names]:
        raise InputError(
            path,
            f"optimizer: param groups of {[len(i) for i in ids]} parameters, the saved weights "
            f"give {[len(n) for n in names]} (LAVIS's split: decayed, not decayed)",
        )
    by_id = {
        i: n for group_ids, group_names in zip(ids, names) for i, n in zip(group_ids, group_names)
    }
    if len(by_id) != sum(len(i) for i in ids):
        raise InputError(path, "optimizer: a parameter id is listed twice")
    entries, steps = {}, {}
    for index, entry in optimizer["state"].items():
        name = by_id.get(index)
        if name is None:
            raise InputError(
                path, f"optimizer: state for parameter id {index!r}, in no param group"
            )
        if not isinstance(entry, dict) or not all(
            k in entry for k in ("step", "exp_avg", "exp_avg_sq")
        ):
            raise InputError(path, f"optimizer: the state of {name} lacks step/exp_avg/exp_avg_sq")
        want = tuple(state[name].shape)
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry[key]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise InputError(path, f"optimizer: {key} of {name} is not a float tensor")
            if tuple(value.shape) != want:
                raise InputError(
                    path,
                    f"optimizer: {key} of {name} has shape {tuple(value.shape)}, the weight {want}",
                )
        entries[name] = (entry["exp_avg"], entry["exp_avg_sq"])
        steps[name] = _step_count(entry["step"], name, path)
    if len(set(steps.values())) > 1:
        low, high = min(steps, key=steps.get), max(steps, key=steps.get)
        raise InputError(
            path,
            f"optimizer: parameters were stepped unequally ({low}: {steps[low]}, {high}: "
            f"{steps[high]}); optax keeps one count",
        )
    hyper = tuple(
        {
            **{k: g[k] for k in ("lr", "betas", "eps", "weight_decay") if k in g},
            "params": len(i),
        }
        for g, i in zip(groups, ids)
    )
    return entries, (next(iter(steps.values())) if steps else 0), hyper


def from_lavis(
    path: str | os.PathLike,
    base: str | os.PathLike,
    loc_offset: int | None = None,
    t5_activation: str = "gelu",
    dtype: str = "float32",
    with_optimizer: bool = False,
):
    """(LLM3D module, params) = the base BLIP-2 directory overlaid with a LAVIS checkpoint;
    with `with_optimizer`, (module, params, LavisMoments or None when the file has no
    optimizer state).

    loc_offset: id of the first location token (= len(tokenizer) the checkpoint was trained
    with: 32100 for FlanT5); default: what the base directory's tokenizer gives, else the T5
    vocab size. The number of location tokens is the checkpoint's vocabulary rows - loc_offset.
    """

    path = os.fspath(path)
    state, optimizer = read_lavis_checkpoint(path)
    module, params = load_blip2(base, dtype=dtype)
    cfg = module.config
    loc_offset = cfg.llm.loc_offset if loc_offset is None else int(loc_offset)
    if not 0 < loc_offset <= cfg.llm.vocab_size:
        raise InputError(
            path, f"loc_offset {loc_offset} outside the T5 vocabulary 1..{cfg.llm.vocab_size}"
        )
    # The Q-Former and the projection must be complete in the checkpoint.
    params, loc_bins = _overlay(
        state, params, cfg, loc_offset, path, allow_missing=[r"(?!qformer/|proj/).*"]
    )
    cfg = llm3d.with_overrides(cfg, loc_offset=loc_offset, loc_bins=loc_bins)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, activation=t5_activation))
    module = llm3d.LLM3D(cfg)
    if not with_optimizer:
        return module, params
    if optimizer is None:
        return module, params, None
    entries, count, groups = lavis_optimizer_state(state, optimizer, path)
    mu, nu = (
        _overlay({k: v[i] for k, v in entries.items()}, params, cfg, loc_offset, path, sparse=True)[
            0
        ]
        for i in (0, 1)
    )
    covered = tuple("/".join(k) for k in traverse_util.flatten_dict(mu))
    return module, params, LavisMoments(mu, nu, count, covered, groups)


def describe_moments(moments: LavisMoments | None) -> str:
    """One line about a checkpoint's optimizer state."""
    if moments is None:
        return "optimizer: no state in the checkpoint (AdamW starts from zero moments)"
    groups = "; ".join(
        ", ".join(f"{k} {v}" for k, v in g.items() if k != "params") + f" ({g['params']} tensors)"
        for g in moments.groups
    )
    return (
        f"optimizer: AdamW state at step {moments.count}, reaching {len(moments.covered)} of the "
        f"model's param tensors; saved groups: {groups}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a released 3D-LLM (LAVIS) checkpoint.")
    parser.add_argument("checkpoint", help="LAVIS .pth file")
    parser.add_argument("--base", required=True, help="HF BLIP-2 (FlanT5) directory")
    parser.add_argument("--loc-offset", type=int, default=None, help="id of <loc0>")
    args = parser.parse_args(argv)
    module, params, moments = from_lavis(
        args.checkpoint, args.base, loc_offset=args.loc_offset, with_optimizer=True
    )
    cfg = module.config
    for group in ("qformer", "proj", "llm"):
        count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params[group]))
        print(f"{group:8s} {count / 1e6:10.3f} M parameters")
    print(
        f"location tokens: {cfg.llm.loc_bins} from id {cfg.llm.loc_offset}; "
        f"T5 activation {cfg.llm.activation}"
    )
    print(describe_moments(moments))
    return 0


if __name__ == "__main__":
    cli_main(main)
