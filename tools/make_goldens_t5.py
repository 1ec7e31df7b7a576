"""Golden outputs of HF transformers T5 for tests/model/test_t5.py (torch venv only).

    /work/torchenv/bin/python tools/make_goldens_t5.py

Writes tests/goldens/t5/:
- t5_v10/ : tiny random T5 v1.0 (relu, head tied to `shared`, d_model**-0.5 rescale), saved by
  `save_pretrained` (transformers 5 config layout);
- flan_t5/ : tiny random FlanT5 / v1.1 (gated-gelu, untied lm_head), config.json written in the
  layout of the released google/flan-t5-* configs (`tie_word_embeddings: false`);
- <name>_io.npz : inputs (padded batch), logits of the reloaded model, 8 greedy tokens;
- buckets.npz : relative position buckets for offsets -300..300 (T5 defaults and the tiny config).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "goldens", "t5"
)

TINY = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    # Few buckets and a short max distance so that short test sequences reach the log buckets.
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)


def inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, TINY["vocab_size"], (2, 12)).astype(np.int64)
    attention_mask = np.ones((2, 12), np.int64)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = 0
    decoder_input_ids = rng.integers(2, TINY["vocab_size"], (2, 7)).astype(np.int64)
    decoder_input_ids[:, 0] = 0
    decoder_attention_mask = np.ones((2, 7), np.int64)
    decoder_attention_mask[0, 5:] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=decoder_attention_mask,
    )


def run(model_dir: str, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = T5ForConditionalGeneration.from_pretrained(
        model_dir, trust_remote_code=False, local_files_only=True
    ).eval()
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    with torch.no_grad():
        logits = model(**t).logits.numpy()
        eager = T5ForConditionalGeneration.from_pretrained(
            model_dir, trust_remote_code=False, local_files_only=True, attn_implementation="eager"
        ).eval()
        np.testing.assert_allclose(eager(**t).logits.numpy(), logits, atol=1e-5)
        # Greedy decoding by full re-evaluation (no cache): the reference for our KV-cache path.
        # (transformers 5.24 `generate` breaks when num_decoder_layers != num_layers.)
        generated = torch.zeros((2, 1), dtype=torch.long)
        for _ in range(8):
            step = model(
                input_ids=t["input_ids"],
                attention_mask=t["attention_mask"],
                decoder_input_ids=generated,
            ).logits[:, -1]
            generated = torch.cat([generated, step.argmax(-1, keepdim=True)], dim=1)
        generated = generated.numpy()
    return dict(io, logits=logits.astype(np.float32), generated=generated.astype(np.int64))


def perturb_norms(model: torch.nn.Module) -> None:
    """HF initialises every T5 LayerNorm to ones: perturb them so a wrong mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))


def make_v10(path: str) -> None:
    torch.manual_seed(0)
    config = T5Config(**TINY, feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.1)
    model = T5ForConditionalGeneration(config)
    perturb_norms(model)
    model.save_pretrained(path)


def make_flan(path: str) -> None:
    torch.manual_seed(1)
    config = T5Config(
        **TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1
    )
    model = T5ForConditionalGeneration(config)
    perturb_norms(model)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # transformers 5 builds T5 with the head tied; FlanT5 checkpoints carry their own lm_head.
    state["lm_head.weight"] = (
        torch.randn(TINY["vocab_size"], TINY["d_model"]) * TINY["d_model"] ** -0.5
    )
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(k, None)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    released_layout = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        **TINY,
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(released_layout, f, indent=2)


def buckets() -> dict[str, np.ndarray]:
    rel = torch.arange(-300, 301)
    out = {"relative_position": rel.numpy()}
    for name, nb, md in (("default", 32, 128), ("tiny", 8, 16)):
        for bidir in (True, False):
            b = T5Attention._relative_position_bucket(
                rel, bidirectional=bidir, num_buckets=nb, max_distance=md
            )
            out[f"{name}_{'bidirectional' if bidir else 'causal'}"] = b.numpy().astype(np.int32)
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, make, seed in (("t5_v10", make_v10, 10), ("flan_t5", make_flan, 11)):
        path = os.path.join(OUT, name)
        make(path)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(path, extra)):
                os.remove(os.path.join(path, extra))
        io = run(path, inputs(seed))
        np.savez(os.path.join(OUT, f"{name}_io.npz"), **io)
        print(name, {k: v.shape for k, v in io.items()})
    np.savez(os.path.join(OUT, "buckets.npz"), **buckets())


if __name__ == "__main__":
    main()
