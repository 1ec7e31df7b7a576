"""Writes the `.pth` fixtures of tests/convert/test_pth.py, test_lavis.py and
tests/train/test_lavis_finetune.py, and the PyTorch reference of one fine-tuning step (needs torch).

Run with the separate torch venv (torch is never a dependency of llm3d_jax):
    /work/torchenv/bin/python tools/make_lavis_fixture.py [--out tests/goldens/lavis]
It needs `transformers`, `safetensors` and `positional-encodings` there. It reads the fixed batch
lavis_step_batch.npz, which the package's own venv writes first (the first batch that
experiments/train.py draws with `STEP`'s settings, `llm3d_jax.train.synthetic`):
    python -m tools.make_lavis_fixture --step-batch

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
                              `t5_proj.*`, `t5_model.*`; trainable weights only) for a tiny model
                              whose frozen base is tests/goldens/qformer/blip2_tiny, saved as the
                              LAVIS runner saves: `{"model", "optimizer", "config", "scaler",
                              "epoch"}`, the weights after 3 torch AdamW steps of the release's
                              loss and the optimizer's own `state_dict()` (param groups built as
                              LAVIS builds them; ln_vision gets no gradient, so no state); the
                              .npz holds the same state dict plus the location-token layout.
  lavis_tiny_ids.json         LAVIS name -> the number torch's optimizer state_dict gives it
  lavis_no_optimizer.pth      the same weights as a bare state dict (no optimizer state)
  lavis_bad_optimizer.pth     the same weights, and an optimizer state whose t5_proj.weight
                              moments have the wrong shape (must fail naming the file)
  lavis_step_batch.npz        (package venv) the fixed batch of `STEP`
  lavis_step.json / .npz      `STEP`'s settings and the release's loss on that batch with the
                              lavis_tiny.pth weights (eval mode: no dropout); the .npz holds the
                              trainable weights after one torch AdamW step from the .pth's
                              optimizer state (lr `STEP["lr"]`), by LAVIS name.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np

try:
    import torch
except ImportError:  # the package venv: --step-batch only
    torch = None


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
WEIGHT_DECAY = 0.05  # LAVIS run_cfg.weight_decay (3D-LLM's configs)
# The fine-tuning step of tests/train/test_lavis_finetune.py: experiments/train.py on synthetic
# batches (`seed`, shapes) over lavis_tiny.pth, at a constant learning rate.
STEP = dict(seed=0, batch_size=2, num_points=16, prompt_len=6, answer_len=4, lr=1e-3)


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


def lavis_parameters(model, ln_vision: dict) -> collections.OrderedDict:
    """LAVIS name -> the reference model's Parameter, for what trains in the release, in the
    order of `Blip2T5.named_parameters()` (the order LAVIS's optimizer numbers them):
    query_tokens (the module's own parameter comes first), ln_vision, Qformer, t5_model's input
    and output embeddings (shared = encoder/decoder embed_tokens: one Parameter), t5_proj."""
    lm = model.language_model
    out = collections.OrderedDict(query_tokens=model.query_tokens)
    out.update(ln_vision)
    for key, param in model.qformer.named_parameters(prefix="qformer"):
        if lavis_name(key) is not None:
            out[lavis_name(key)] = param
    out["t5_model.shared.weight"] = lm.shared.weight
    out["t5_model.lm_head.weight"] = lm.lm_head.weight
    for key, param in model.language_projection.named_parameters(prefix="language_projection"):
        out[lavis_name(key)] = param
    return out


def lavis_optimizer(params: dict, lr: float):
    """torch AdamW with LAVIS's two param groups (runner_base.RunnerBase.optimizer): decayed,
    then not (1-D tensors and names holding "bias", "ln" or "bn")."""
    decay, no_decay = [], []
    for name, param in params.items():
        skip = param.ndim < 2 or any(s in name for s in ("bias", "ln", "bn"))
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999))


def lavis_state_dict(params: dict) -> collections.OrderedDict:
    """What `Blip2T5.state_dict()` keeps after LAVIS drops the frozen weights, in its order:
    the trainable weights, the Q-Former's position_ids buffer, the T5 embedding under its three
    tied names (one storage)."""
    state = collections.OrderedDict()
    for name, param in params.items():
        value = param.detach().clone()
        if name == "Qformer.bert.embeddings.LayerNorm.weight":  # BertEmbeddings' own buffer first
            state["Qformer.bert.embeddings.position_ids"] = torch.arange(32).expand(1, -1)
        state[name] = value
        if name == "t5_model.shared.weight":
            state["t5_model.encoder.embed_tokens.weight"] = value
            state["t5_model.decoder.embed_tokens.weight"] = value
    return state


def random_batch(rng, b: int, n: int, lp: int, la: int, dim: int) -> dict[str, np.ndarray]:
    """Inputs of the reference forward: padded points, prompts and answers (words and <loc>)."""
    point_mask = np.ones((b, n), np.int64)
    point_mask[1, n * 3 // 5 :] = 0
    prompt_mask = np.ones((b, lp), np.int64)
    prompt_mask[1, 3:] = 0
    answer_mask = np.ones((b, la), np.int64)
    answer_mask[0, la - 1 :] = 0
    return dict(
        features=rng.standard_normal((b, n, dim)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=point_mask,
        prompt_ids=rng.integers(2, LOC_OFFSET, (b, lp)) * prompt_mask,
        prompt_mask=prompt_mask,
        # answers mix words and location tokens (ids LOC_OFFSET..), as grounding answers do
        answer_ids=rng.integers(2, LOC_OFFSET + LOC_BINS, (b, la)) * answer_mask,
        answer_mask=answer_mask,
    )


def lavis_fixture(out: str, base_dir: str) -> None:
    """A released-3D-LLM-style checkpoint: trainable weights only (frozen ViT/T5 body absent),
    with the AdamW state of a few real steps."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    weights = {}
    for key in sorted(base):
        name = lavis_name(key)
        if name is not None:  # perturbed, so an import that keeps the base values shows
            weights[name] = base[key] + 0.05 * torch.randn(base[key].shape, generator=g)
    d_model = base["language_projection.weight"].shape[0]
    # resize_token_embeddings(len(tokenizer) + 64 <loc> tokens): rows [0, 60) base, [60, 68) loc
    weights["t5_model.shared.weight"] = torch.randn(LOC_OFFSET + LOC_BINS, d_model, generator=g)
    weights["t5_model.lm_head.weight"] = torch.randn(LOC_OFFSET + LOC_BINS, d_model, generator=g)
    model = reference_model(base_dir, weights)
    # ln_vision trains in LAVIS but 3D-LLM's forward never uses it: no gradient, no state.
    ln_vision = {
        "ln_vision.weight": torch.nn.Parameter(torch.ones(24)),
        "ln_vision.bias": torch.nn.Parameter(torch.zeros(24)),
    }
    params = lavis_parameters(model, ln_vision)
    optimizer = lavis_optimizer(params, lr=1e-3)
    dim = model.config.qformer_config.encoder_hidden_size
    rng = np.random.default_rng(7)
    for _ in range(3):
        loss = release_loss(model, random_batch(rng, 2, 10, 5, 6, dim))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = lavis_state_dict(params)
    obj = {"model": state, "optimizer": optimizer.state_dict(), "config": {"run": {"task": "3d_vqa"}},
           "scaler": None, "epoch": 2}  # fmt: skip
    torch.save(obj, os.path.join(out, "lavis_tiny.pth"))
    np.savez(
        os.path.join(out, "lavis_tiny.npz"),
        loc_offset=np.int32(LOC_OFFSET),
        loc_bins=np.int32(LOC_BINS),
        **{k: v.numpy() for k, v in state.items()},
    )
    io = random_batch(np.random.default_rng(5), 2, 10, 5, 6, dim)
    np.savez(os.path.join(out, "lavis_tiny_io.npz"), **reference_forward(model, io))

    numbered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict ids
    ids = {
        name: next(i for i, p in enumerate(numbered) if p is param)
        for name, param in params.items()
    }
    with open(os.path.join(out, "lavis_tiny_ids.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(ids, indent=1) + "\n")

    torch.save(state, os.path.join(out, "lavis_no_optimizer.pth"))
    bad = optimizer.state_dict()
    index = ids["t5_proj.weight"]
    entry = bad["state"][index]
    entry["exp_avg"] = entry["exp_avg"].t().contiguous()  # [in, out]: the wrong layout
    bad["state"] = {index: entry}  # the other entries may be absent: only this one is wrong
    torch.save({"model": state, "optimizer": bad, "epoch": 2},
               os.path.join(out, "lavis_bad_optimizer.pth"))  # fmt: skip

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


def reference_model(base_dir: str, weights: dict):
    """The released 3D-LLM in transformers' modules over the base BLIP-2 directory, with the
    LAVIS-named `weights`: T5 with exact-GELU FFN (LAVIS sets `dense_act_fn = "gelu"`) and its
    vocabulary resized to len(tokenizer) + <loc> rows, untied head. Eval mode (no dropout)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config.from_pretrained(base_dir, trust_remote_code=False, local_files_only=True)
    config.text_config.dense_act_fn = "gelu"
    model = Blip2ForConditionalGeneration.from_pretrained(
        base_dir, trust_remote_code=False, local_files_only=True, config=config
    ).eval()
    model.language_model.resize_token_embeddings(LOC_OFFSET + LOC_BINS)
    hf_state = {k: weights[lavis_name(k)] for k in model.state_dict() if lavis_name(k) in weights}
    result = model.load_state_dict(hf_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    lm = model.language_model
    with torch.no_grad():  # transformers 5 re-ties the T5 head on load and resize: untie it
        lm.lm_head = torch.nn.Linear(lm.config.d_model, LOC_OFFSET + LOC_BINS, bias=False)
        lm.lm_head.weight.copy_(weights["t5_model.lm_head.weight"])
        lm.shared.weight.copy_(weights["t5_model.shared.weight"])
    assert lm.encoder.embed_tokens.weight is lm.shared.weight
    assert lm.decoder.embed_tokens.weight is lm.shared.weight
    assert not getattr(lm.config, "scale_decoder_outputs", False)
    return model


def query_embeds(model, io: dict):
    """features + 0.01 pe -> Q-Former -> t5_proj (Blip2T5.forward up to the T5 input)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in io.items()}
    b, dim = t["features"].shape[0], model.config.qformer_config.encoder_hidden_size
    states = t["features"] + 0.01 * torch.from_numpy(position_embedding(io["voxels"], dim))
    # The release attends to every point (its scenes have no padding): ours pads, with a mask.
    queries = model.qformer(
        query_embeds=model.query_tokens.expand(b, -1, -1),
        encoder_hidden_states=states,
        encoder_attention_mask=t["point_mask"].long(),
    ).last_hidden_state
    return t, queries, model.language_projection(queries)


def release_loss(model, io: dict):
    """Blip2T5.forward's loss: T5 over [queries; prompt] with the answer as `labels` (padding
    -100), i.e. the mean cross-entropy over the answer tokens."""
    t, _, projected = query_embeds(model, io)
    lm = model.language_model
    b = projected.shape[0]
    embeds = torch.cat([projected, lm.encoder.embed_tokens(t["prompt_ids"].long())], dim=1)
    mask = torch.cat(
        [torch.ones(b, projected.shape[1], dtype=torch.long), t["prompt_mask"].long()], 1
    )
    labels = t["answer_ids"].long().masked_fill(t["answer_mask"] == 0, -100)
    return lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        decoder_attention_mask=t["answer_mask"].long(),
        labels=labels,
    ).loss


def reference_forward(model, io: dict) -> dict[str, np.ndarray]:
    """`io` plus the Q-Former output and the teacher-forced logits of the reference model."""
    with torch.no_grad():
        t, queries, projected = query_embeds(model, io)
        lm = model.language_model
        b = projected.shape[0]
        embeds = torch.cat([projected, lm.get_input_embeddings()(t["prompt_ids"])], dim=1)
        mask = torch.cat([torch.ones(b, projected.shape[1], dtype=torch.long), t["prompt_mask"]], 1)
        decoder_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), t["answer_ids"][:, :-1]], 1)
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=t["answer_mask"],
        ).logits
    return {**io, "query_output": queries.numpy(), "logits": logits.numpy()}


def write_step_batch(out: str, base_dir: str) -> None:
    """(package venv) The first batch experiments/train.py draws with `STEP`'s settings."""
    from llm3d_jax.convert.hf import read_config
    from llm3d_jax.train.synthetic import SyntheticBatches

    dim = read_config(base_dir)["qformer_config"]["encoder_hidden_size"]
    batches = SyntheticBatches(
        **{k: STEP[k] for k in ("batch_size", "num_points", "prompt_len", "answer_len", "seed")},
        feature_dim=dim,
        vocab_size=LOC_OFFSET,
        answer_offset=LOC_OFFSET,
        sharding=None,
    )
    np.savez(os.path.join(out, "lavis_step_batch.npz"), **batches.host_batch(0))


def step_golden(out: str, base_dir: str) -> None:
    """The release's loss on the fixed batch with lavis_tiny.pth, then one torch AdamW step from
    the checkpoint's optimizer state (RunnerBase._load_checkpoint: load_state_dict of both)."""
    checkpoint = torch.load(os.path.join(out, "lavis_tiny.pth"), weights_only=True)
    weights = checkpoint["model"]
    model = reference_model(base_dir, weights)
    ln_vision = {
        k: torch.nn.Parameter(weights[k].clone()) for k in ("ln_vision.weight", "ln_vision.bias")
    }
    params = lavis_parameters(model, ln_vision)
    optimizer = lavis_optimizer(params, lr=STEP["lr"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:  # the saved groups carry the saving run's lr
        group["lr"] = STEP["lr"]
    with np.load(os.path.join(out, "lavis_step_batch.npz"), allow_pickle=False) as f:
        batch = {k: f[k] for k in f.files}
    loss = release_loss(model, batch)
    loss.backward()
    optimizer.step()
    summary = {**STEP, "weight_decay": WEIGHT_DECAY, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
               "loss": float(loss.detach()), "torch": torch.__version__}  # fmt: skip
    with open(os.path.join(out, "lavis_step.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    after = {k: p.detach().numpy() for k, p in params.items() if not k.startswith("ln_vision.")}
    np.savez(os.path.join(out, "lavis_step.npz"), **after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "goldens", "lavis"))
    parser.add_argument(
        "--base",
        default=os.path.join("tests", "goldens", "qformer", "blip2_tiny"),
        help="tiny HF BLIP-2 directory (tools/make_goldens_qformer.py) the fixture fine-tunes",
    )
    parser.add_argument(
        "--step-batch", action="store_true", help="(package venv) write lavis_step_batch.npz only"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.step_batch:
        write_step_batch(args.out, args.base)
    else:
        if torch is None:
            raise SystemExit("needs torch: run it with the torch venv (see the docstring)")
        tensors_fixture(args.out)
        lavis_fixture(args.out, args.base)
        step_golden(args.out, args.base)
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
