"""Writes the `.pth` fixtures of tests/convert/test_pth.py and test_lavis.py (needs torch).

Run with the separate torch venv (torch is never a dependency of llm3d_jax):
    /work/torchenv/bin/python tools/make_lavis_fixture.py [--out tests/goldens/lavis]

Files:
  tensors.pth / tensors.npz   torch.save of a LAVIS-style `{"model": state_dict, "epoch", ...}`
                              covering every dtype, views with strides/offsets, shared storages,
                              Parameters; the .npz holds the same numbers (bf16 as float32).
  unsafe.pth                  a checkpoint whose "config" is an `argparse.Namespace` (a non-tensor
                              pickle global, as some training scripts save): must be refused.
  lavis_tiny.pth / .npz       the released 3D-LLM layout (`Qformer.bert.*`, `query_tokens`,
                              `t5_proj.*`, `t5_model.*`; trainable weights only, wrapped in
                              `{"model": ..., "optimizer": ..., "epoch": ...}`) for a tiny model
                              whose frozen base is tests/goldens/qformer/blip2_tiny; the .npz holds
                              the same state dict plus the location-token layout.
"""

from __future__ import annotations

import argparse
import collections
import os

import numpy as np
import torch


def tensors_fixture(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    state = collections.OrderedDict(
        [
            ("f32", torch.randn(3, 4, generator=g)),
            ("f64", torch.randn(2, 3, generator=g, dtype=torch.float64)),
            ("f16", torch.randn(4, 2, generator=g).half()),
            ("bf16", torch.randn(3, 3, generator=g).bfloat16()),
            ("i64", torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4)),
            ("i32", torch.arange(6, dtype=torch.int32)),
            ("i16", torch.arange(-3, 3, dtype=torch.int16)),
            ("i8", torch.arange(-4, 4, dtype=torch.int8)),
            ("u8", torch.arange(250, 256, dtype=torch.uint8)),
            ("bool", torch.tensor([True, False, True])),
            ("transposed", base.t()),  # non-contiguous strides
            ("sliced", base[1:5:2, 1:4]),  # offset and strides into a shared storage
            ("base", base),
            ("shared_a", shared[2:8]),  # two views of one storage
            ("shared_b", shared[10:].view(2, 5)),
            ("scalar", torch.tensor(3.5)),
            ("empty", torch.zeros(0, 4)),
            ("param", torch.nn.Parameter(torch.randn(2, 2, generator=g))),
        ]
    )
    obj = {
        "model": state,
        "epoch": 3,
        "config": {"lr": 1e-4, "name": "tiny", "betas": (0.9, 0.999)},
        "extra": [torch.ones(2), torch.zeros(1, dtype=torch.int64)],
    }
    torch.save(obj, os.path.join(out, "tensors.pth"))
    flat = {
        f"model.{k}": v.detach().float().numpy()
        if v.dtype == torch.bfloat16
        else v.detach().numpy()
        for k, v in state.items()
    }
    flat["extra.0"] = obj["extra"][0].numpy()
    flat["extra.1"] = obj["extra"][1].numpy()
    np.savez(os.path.join(out, "tensors.npz"), **flat)

    unsafe = {"model": {"w": torch.ones(2)}, "config": argparse.Namespace(lr=1e-4)}
    torch.save(unsafe, os.path.join(out, "unsafe.pth"))


LOC_OFFSET, LOC_BINS = 60, 8  # tiny stand-ins for len(tokenizer) = 32100 and the 64 <loc> tokens


def lavis_name(hf_key: str) -> str | None:
    """HF BLIP-2 key -> the LAVIS Blip2T5 name of the same tensor (None: not in the release)."""
    if hf_key == "query_tokens":
        return hf_key
    if hf_key.startswith("language_projection."):
        return "t5_proj." + hf_key.removeprefix("language_projection.")
    if hf_key.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + hf_key.removeprefix("qformer.layernorm.")
    if hf_key.startswith("qformer.encoder."):
        name = hf_key.replace("attention.attention.", "attention.self.")
        return "Qformer.bert." + name.removeprefix("qformer.")
    return None


def lavis_fixture(out: str, base_dir: str) -> None:
    """A released-3D-LLM-style checkpoint: trainable weights only (frozen ViT/T5 body absent)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    state = collections.OrderedDict()
    for key in sorted(base):
        name = lavis_name(key)
        if name is not None:  # perturbed, so an import that keeps the base values shows
            state[name] = base[key] + 0.05 * torch.randn(base[key].shape, generator=g)
    d_model = base["language_projection.weight"].shape[0]
    # resize_token_embeddings(len(tokenizer) + 64 <loc> tokens): rows [0, 60) base, [60, 68) loc
    shared = torch.randn(LOC_OFFSET + LOC_BINS, d_model, generator=g)
    state["t5_model.shared.weight"] = shared
    state["t5_model.encoder.embed_tokens.weight"] = shared  # tied: one storage, three names
    state["t5_model.decoder.embed_tokens.weight"] = shared
    state["t5_model.lm_head.weight"] = torch.randn(LOC_OFFSET + LOC_BINS, d_model, generator=g)
    state["ln_vision.weight"] = torch.ones(24)  # trainable in LAVIS, unused by 3D-LLM
    state["ln_vision.bias"] = torch.zeros(24)
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(32).expand(1, -1)
    optimizer = {
        "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}],
    }
    obj = {"model": state, "optimizer": optimizer, "config": {"run": {"task": "3d_vqa"}},
           "scaler": None, "epoch": 2}  # fmt: skip
    torch.save(obj, os.path.join(out, "lavis_tiny.pth"))
    np.savez(
        os.path.join(out, "lavis_tiny.npz"),
        loc_offset=np.int32(LOC_OFFSET),
        loc_bins=np.int32(LOC_BINS),
        **{k: v.numpy() for k, v in state.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "goldens", "lavis"))
    parser.add_argument(
        "--base",
        default=os.path.join("tests", "goldens", "qformer", "blip2_tiny"),
        help="tiny HF BLIP-2 directory (tools/make_goldens_qformer.py) the fixture fine-tunes",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tensors_fixture(args.out)
    lavis_fixture(args.out, args.base)
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
