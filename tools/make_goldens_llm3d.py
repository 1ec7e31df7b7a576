"""Golden outputs of the whole BLIP-2 -> 3D-LLM path in PyTorch for tests/model/test_llm3d.py.

    /work/torchenv/bin/python tools/make_goldens_llm3d.py

Writes tests/goldens/llm3d/:
- blip2_tiny/ : a tiny random HF `Blip2ForConditionalGeneration` with a FlanT5-style language
  model (gated-gelu, untied lm_head), safetensors; every LayerNorm and bias perturbed so that a
  wrong mapping shows;
- blip2_tiny_io.npz : point features, voxels, masks, prompt and answer ids; the reference
  computation of the released 3D-LLM forward pass:
    features + 0.01 * pos-embed(voxels)   (numpy formula of docs/reference.md; D = 28, odd D//3 = 9)
    -> model.qformer(query_embeds=query_tokens, encoder_hidden_states, encoder_attention_mask)
    -> language_projection
    -> language_model(inputs_embeds=[queries; embed(prompt)], attention_mask=[ones; prompt_mask],
                      decoder_input_ids=shift_right(answer), decoder_attention_mask=answer_mask)
  with its Q-Former output, logits, and 6 greedy tokens (full re-evaluation, no cache).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    T5Config,
)

OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "goldens", "llm3d"
)
FEATURE_DIM = 28  # 28 // 3 = 9 columns per axis (odd, like 1408 // 3 = 469), one zero column
TEXT_VOCAB = 160


def sincos_table(num_positions: int, channels: int) -> np.ndarray:
    """docs/reference.md: inv_freq_k = 1 / 10000^(2k / C'), [sin, cos] interleaved, cut to C."""
    even = channels + channels % 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, even, 2, dtype=np.float64) / even))
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(num_positions, even)
    return table[:, :channels]


def position_embedding(voxels: np.ndarray, dim: int) -> np.ndarray:
    c = dim // 3
    table = sincos_table(256, c)
    pe = np.concatenate([table[voxels[..., i]] for i in range(3)], axis=-1)
    return np.pad(pe, [(0, 0)] * (pe.ndim - 1) + [(0, dim - 3 * c)]).astype(np.float32)


def build(path: str) -> None:
    torch.manual_seed(0)
    vision = Blip2VisionConfig(
        hidden_size=FEATURE_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        cross_attention_frequency=2,
        encoder_hidden_size=FEATURE_DIM,
        vocab_size=32,
        max_position_embeddings=16,
    )
    text = T5Config(
        vocab_size=TEXT_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=6,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.startswith(("qformer.", "query_tokens", "language_projection.")):
                p.copy_(0.1 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # transformers 5 builds the T5 head tied; FlanT5 checkpoints carry their own lm_head.
    state["language_model.lm_head.weight"] = torch.randn(TEXT_VOCAB, 32) * 32**-0.5
    for k in (
        "language_model.encoder.embed_tokens.weight",
        "language_model.decoder.embed_tokens.weight",
    ):
        state.pop(k, None)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        written = json.load(f)
    written["text_config"]["tie_word_embeddings"] = False  # as the released BLIP-2 FlanT5 configs
    written["text_config"].pop("scale_decoder_outputs", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(written, f, indent=2)


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    b, n, lp, la = 2, 10, 5, 6
    point_mask = np.ones((b, n), np.int64)
    point_mask[1, 7:] = 0
    prompt_mask = np.ones((b, lp), np.int64)
    prompt_mask[0, 4:] = 0
    answer_mask = np.ones((b, la), np.int64)
    answer_mask[1, 4:] = 0
    return dict(
        features=rng.standard_normal((b, n, FEATURE_DIM)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=point_mask,
        prompt_ids=(rng.integers(2, TEXT_VOCAB, (b, lp)) * prompt_mask).astype(np.int64),
        prompt_mask=prompt_mask,
        answer_ids=(rng.integers(2, TEXT_VOCAB, (b, la)) * answer_mask).astype(np.int64),
        answer_mask=answer_mask,
    )


def forward(model, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    states = torch.from_numpy(io["features"] + 0.01 * position_embedding(io["voxels"], FEATURE_DIM))
    batch = states.shape[0]
    with torch.no_grad():
        queries = model.query_tokens.expand(batch, -1, -1)
        query_output = model.qformer(
            query_embeds=queries,
            encoder_hidden_states=states,
            encoder_attention_mask=t["point_mask"],
        ).last_hidden_state
        projected = model.language_projection(query_output)
        lm = model.language_model

        def run(decoder_input_ids, decoder_attention_mask=None):
            prompt = lm.get_input_embeddings()(t["prompt_ids"])
            embeds = torch.cat([projected, prompt], dim=1)
            mask = torch.cat(
                [torch.ones(projected.shape[:2], dtype=torch.long), t["prompt_mask"]], dim=1
            )
            return lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
            ).logits

        answer = t["answer_ids"]
        decoder_input_ids = torch.cat([torch.zeros_like(answer[:, :1]), answer[:, :-1]], dim=1)
        logits = run(decoder_input_ids, t["answer_mask"])
        generated = torch.zeros((batch, 1), dtype=torch.long)
        for _ in range(6):
            step = run(generated)[:, -1]
            generated = torch.cat([generated, step.argmax(-1, keepdim=True)], dim=1)
    return dict(
        io,
        query_output=query_output.numpy(),
        logits=logits.numpy().astype(np.float32),
        generated=generated.numpy()[:, 1:],
    )


def main() -> None:
    path = os.path.join(OUT, "blip2_tiny")
    build(path)
    model = Blip2ForConditionalGeneration.from_pretrained(
        path, trust_remote_code=False, local_files_only=True
    ).eval()
    lm = model.language_model
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight), "lm_head must stay untied"
    io = forward(model, inputs())
    np.savez(os.path.join(OUT, "blip2_tiny_io.npz"), **io)
    print({k: v.shape for k, v in io.items()})


if __name__ == "__main__":
    main()
