"""Writes the `.pth` fixtures of tests/convert/test_pth.py and test_lavis.py (needs torch).

Run with the separate torch venv (torch is never a dependency of llm3d_jax):
    /work/torchenv/bin/python tools/make_lavis_fixture.py [--out tests/goldens/lavis]

Files:
  tensors.pth / tensors.npz   torch.save of a LAVIS-style `{"model": state_dict, "epoch", ...}`
                              covering every dtype, views with strides/offsets, shared storages,
                              Parameters; the .npz holds the same numbers (bf16 as float32).
  lavis_bad_shape.pth         t5_proj.weight of the wrong width (must fail naming key and shapes)
  lavis_partial.pth           a Q-Former with most tensors missing (must fail: incomplete)
  unsafe.pth                  a checkpoint whose "config" is an `argparse.Namespace` (a non-tensor
                              pickle global, as some training scripts save): must be refused.
  lavis_tiny_io.npz           inputs and the reference 3D-LLM forward (Q-Former output, logits)
                              with those weights, computed by transformers' modules
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
from transformers import Blip2Config, Blip2ForConditionalGeneration


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
            ("u16", torch.tensor([0, 7, 65535], dtype=torch.uint16)),  # _rebuild_tensor_v3 path
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
    np.savez(os.path.join(out, "lavis_tiny_io.npz"), **reference_forward(base_dir, state))

    # Broken variants (a few tensors each): a projection of the wrong width; a Q-Former cut short.
    norm = "Qformer.bert.embeddings.LayerNorm.weight"
    small = {k: state[k] for k in (norm, "query_tokens", "t5_proj.weight", "t5_proj.bias")}
    torch.save({"model": {**small, "t5_proj.weight": torch.zeros(d_model, 30)}},
               os.path.join(out, "lavis_bad_shape.pth"))  # fmt: skip
    torch.save({"model": small}, os.path.join(out, "lavis_partial.pth"))


def position_embedding(voxels: np.ndarray, dim: int) -> np.ndarray:
    """The released code's table (positional_encodings.PositionalEncoding1D), 3 axes, 0-padded."""
    from positional_encodings.torch_encodings import PositionalEncoding1D

    c = dim // 3
    table = PositionalEncoding1D(c)(torch.zeros(1, 256, c))[0].numpy()
    pe = np.concatenate([table[voxels[..., i]] for i in range(3)], axis=-1)
    return np.pad(pe, [(0, 0)] * (pe.ndim - 1) + [(0, dim - 3 * c)]).astype(np.float32)


def reference_forward(base_dir: str, state: dict) -> dict[str, np.ndarray]:
    """The released 3D-LLM forward with the fixture's weights, in transformers' modules:
    features + 0.01 pe -> Q-Former -> t5_proj -> T5 (exact-GELU FFN, as LAVIS sets
    `dense_act_fn = "gelu"`; vocabulary resized to len(tokenizer) + <loc> rows) -> logits."""
    config = Blip2Config.from_pretrained(base_dir, trust_remote_code=False, local_files_only=True)
    config.text_config.dense_act_fn = "gelu"
    model = Blip2ForConditionalGeneration.from_pretrained(
        base_dir, trust_remote_code=False, local_files_only=True, config=config
    ).eval()
    model.language_model.resize_token_embeddings(LOC_OFFSET + LOC_BINS)
    hf_state = {k: state[lavis_name(k)] for k in model.state_dict() if lavis_name(k) in state}
    result = model.load_state_dict(hf_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    lm = model.language_model
    with torch.no_grad():  # transformers 5 re-ties the T5 head on load and resize: untie it
        lm.lm_head = torch.nn.Linear(lm.config.d_model, LOC_OFFSET + LOC_BINS, bias=False)
        lm.lm_head.weight.copy_(state["t5_model.lm_head.weight"])
        lm.shared.weight.copy_(state["t5_model.shared.weight"])
    assert lm.encoder.embed_tokens.weight is lm.shared.weight
    assert not getattr(lm.config, "scale_decoder_outputs", False)

    rng = np.random.default_rng(5)
    b, n, lp, la, dim = 2, 10, 5, 6, config.qformer_config.encoder_hidden_size
    point_mask = np.ones((b, n), np.int64)
    point_mask[1, 6:] = 0
    prompt_mask = np.ones((b, lp), np.int64)
    prompt_mask[1, 3:] = 0
    answer_mask = np.ones((b, la), np.int64)
    answer_mask[0, 5:] = 0
    io = dict(
        features=rng.standard_normal((b, n, dim)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=point_mask,
        prompt_ids=rng.integers(2, LOC_OFFSET, (b, lp)) * prompt_mask,
        prompt_mask=prompt_mask,
        # answers mix words and location tokens (ids LOC_OFFSET..), as grounding answers do
        answer_ids=rng.integers(2, LOC_OFFSET + LOC_BINS, (b, la)) * answer_mask,
        answer_mask=answer_mask,
    )
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    states = torch.from_numpy(io["features"] + 0.01 * position_embedding(io["voxels"], dim))
    with torch.no_grad():
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(b, -1, -1),
            encoder_hidden_states=states,
            encoder_attention_mask=t["point_mask"],
        ).last_hidden_state
        projected = model.language_projection(queries)
        embeds = torch.cat([projected, lm.get_input_embeddings()(t["prompt_ids"])], dim=1)
        mask = torch.cat([torch.ones(b, projected.shape[1], dtype=torch.long), t["prompt_mask"]], 1)
        decoder_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), t["answer_ids"][:, :-1]], 1)
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=t["answer_mask"],
        ).logits
    io["query_output"] = queries.numpy()
    io["logits"] = logits.numpy()
    return io


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
