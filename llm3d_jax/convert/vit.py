"""HF vision towers -> `llm3d_jax.model.vit` parameters: mapping tables plus two small hooks.

Keys are read without the `vision_model.` prefix: a full BLIP-2 / CLIP directory stores the tower
under it (only those tensors are read, so a 15 GB BLIP-2 directory costs ~4 GB of reads, not 15),
and CLIPVisionModel checkpoints saved by transformers v4 carry it too.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from safetensors import safe_open

from llm3d_jax.convert.hf import Rule, apply_rules, read_config, transpose
from llm3d_jax.fileio import InputError
from llm3d_jax.model.vit import ViTConfig, param_shapes

# config.json model_type -> (layout, whether the tower sits under `vision_model.`)
MODEL_TYPES = {
    "blip_2_vision_model": ("blip2", False),
    "blip-2": ("blip2", True),
    "blip_2": ("blip2", True),
    "clip_vision_model": ("clip", False),
    "clip": ("clip", True),
}


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O,I,kh,kw] -> Flax Conv kernel [kh,kw,I,O] (NHWC images)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def flat_rows(w: np.ndarray) -> np.ndarray:
    """BLIP-2 stores class/position embeddings as [1,1,C] / [1,T,C]: drop the leading 1s."""
    return w.reshape(w.shape[-2:]) if w.ndim == 3 and w.shape[1] > 1 else w.reshape(-1)


_LAYER = r"encoder\.layers\.(\d+)\."
_COMMON_LAYER_RULES: list[Rule] = [
    (_LAYER + r"layer_norm1\.weight", r"layers_\1/norm1/scale", None),
    (_LAYER + r"layer_norm1\.bias", r"layers_\1/norm1/bias", None),
    (_LAYER + r"layer_norm2\.weight", r"layers_\1/norm2/scale", None),
    (_LAYER + r"layer_norm2\.bias", r"layers_\1/norm2/bias", None),
    (_LAYER + r"mlp\.fc1\.weight", r"layers_\1/fc1/kernel", transpose),
    (_LAYER + r"mlp\.fc1\.bias", r"layers_\1/fc1/bias", None),
    (_LAYER + r"mlp\.fc2\.weight", r"layers_\1/fc2/kernel", transpose),
    (_LAYER + r"mlp\.fc2\.bias", r"layers_\1/fc2/bias", None),
]

BLIP2_RULES: list[Rule] = [
    (r"embeddings\.class_embedding", "cls_token", flat_rows),
    (r"embeddings\.position_embedding", "pos_embed", flat_rows),
    (r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", conv_kernel),
    (r"embeddings\.patch_embedding\.bias", "patch_embed/bias", None),
    # qkv.bias is [q_bias, 0, v_bias] concatenated, exactly as transformers stores it.
    (_LAYER + r"self_attn\.qkv\.weight", r"layers_\1/attn/qkv/kernel", transpose),
    (_LAYER + r"self_attn\.qkv\.bias", r"layers_\1/attn/qkv/bias", None),
    (_LAYER + r"self_attn\.projection\.weight", r"layers_\1/attn/out/kernel", transpose),
    (_LAYER + r"self_attn\.projection\.bias", r"layers_\1/attn/out/bias", None),
    *_COMMON_LAYER_RULES,
    (r"post_layernorm\.weight", "post_norm/scale", None),
    (r"post_layernorm\.bias", "post_norm/bias", None),
]

CLIP_RULES: list[Rule] = [
    (r"embeddings\.class_embedding", "cls_token", None),
    (r"embeddings\.position_embedding\.weight", "pos_embed", None),
    (r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", conv_kernel),
    (r"embeddings\.position_ids", None, None),  # a buffer (arange) in old checkpoints
    (r"pre_layrnorm\.weight", "pre_norm/scale", None),  # sic: transformers' spelling
    (r"pre_layrnorm\.bias", "pre_norm/bias", None),
    *[
        (_LAYER + rf"self_attn\.{hf}_proj\.{kind}", rf"layers_\1/attn/{ours}/{flax}", hook)
        for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "out"))
        for kind, flax, hook in (("weight", "kernel", transpose), ("bias", "bias", None))
    ],
    *_COMMON_LAYER_RULES,
    # CLIP normalises only the pooled CLS token with it; the last hidden state does not use it.
    (r"post_layernorm\.(weight|bias)", None, None),
]

RULES = {"blip2": BLIP2_RULES, "clip": CLIP_RULES}


def _safetensors_files(path: str, prefixed: bool) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        # Only the shards that hold vision weights need opening.
        return sorted(
            {v for k, v in weight_map.items() if not prefixed or k.startswith("vision_model.")}
        )
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        raise InputError(path, "no *.safetensors weights (only safetensors checkpoints are read)")
    return names


def read_vision_tensors(path: str, prefixed: bool) -> dict[str, np.ndarray]:
    """The vision tower's tensors as float32 numpy, keys without `vision_model.`."""
    tensors = {}
    for name in _safetensors_files(path, prefixed):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise InputError(file, "weight shard listed in the index is missing")
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    if prefixed and not key.startswith("vision_model."):
                        continue
                    value = f.get_tensor(key)
                    if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
                        value = value.astype(np.float32)
                    tensors[key.removeprefix("vision_model.")] = value
        except InputError:
            raise
        except Exception as err:
            raise InputError(file, f"unreadable safetensors file ({err})") from None
    if not tensors:
        raise InputError(path, "no vision_model.* weights in this directory")
    return tensors


def _image_normalisation(path: str, config: ViTConfig) -> ViTConfig:
    """image_mean/std from preprocessor_config.json when the directory has one."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
        return config
    try:
        with open(file, encoding="utf-8") as f:
            pre = json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(file, f"not valid JSON ({err})") from None
    mean, std = pre.get("image_mean", config.image_mean), pre.get("image_std", config.image_std)
    if len(mean) != 3 or len(std) != 3:
        raise InputError(file, "image_mean and image_std must have 3 values")
    return dataclasses.replace(config, image_mean=tuple(mean), image_std=tuple(std))


def load_vit(path: str | os.PathLike, kind: str | None = None) -> tuple[ViTConfig, dict]:
    """(ViTConfig, params) of a local HF vision directory; `kind` = "blip2" | "clip" | None (any)."""
    path = os.fspath(path)
    hf_config = read_config(path)
    model_type = hf_config.get("model_type", "<none>")
    if model_type not in MODEL_TYPES:
        want = {"blip2": "a BLIP-2", "clip": "a CLIP"}.get(kind, "a BLIP-2 or CLIP")
        raise InputError(
            path,
            f"not {want} vision checkpoint (config.json model_type is {model_type!r}; "
            f"expected one of {sorted(MODEL_TYPES)})",
        )
    layout, prefixed = MODEL_TYPES[model_type]
    if kind is not None and kind != layout:
        raise InputError(
            path, f"expected a {kind} checkpoint, but config.json model_type is {model_type!r}"
        )
    try:
        config = ViTConfig.from_hf(hf_config)
    except ValueError as err:
        raise InputError(os.path.join(path, "config.json"), str(err)) from None
    config = _image_normalisation(path, config)
    tensors = read_vision_tensors(path, prefixed)
    params = apply_rules(tensors, RULES[config.layout], param_shapes(config), source=path)
    return config, params
