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
                              `{"model": ...}`) for a tiny model whose frozen base is the HF BLIP-2
                              directory `blip2_base/` written next to it.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "goldens", "lavis"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tensors_fixture(args.out)
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
