"""Golden outputs of HF transformers decoder-only LMs for tests/model/test_decoder.py (torch venv).

    /work/torchenv/bin/python tools/make_goldens_decoder.py

Writes tests/goldens/decoder/ (tiny random models; every norm weight and bias perturbed so that a
wrong mapping shows; weights drawn with std 0.15 so the logits are O(1)):
- opt/         : OPTForCausalLM, pre-LN, biases, head tied to the embedding;
- opt_postln/  : OPT-350m style: post-LN (no final norm), project_in/out (word_embed_proj_dim 16);
- llama3/      : LlamaForCausalLM, GQA 4/2, Llama 3 rope scaling (every branch of the frequency
                 rule is hit with head_dim 8 and original_max_position_embeddings 64), untied
                 head, saved as 3 safetensors shards with model.safetensors.index.json;
- qwen2/       : Qwen2ForCausalLM, q/k/v bias, tied head, GQA 4/1, sliding window 4 on layer 1
                 only (use_sliding_window, max_window_layers=1), rope_theta 1e6;
- mistral/     : MistralForCausalLM, GQA 4/2, head_dim 16 != hidden/heads, sliding window 5;
- <name>_io.npz: input_ids / attention_mask [2,12] (row 1 right-padded after 9 tokens), logits of
                 the reloaded model (compare where attention_mask is 1), gen_prompt [2,10]
                 (no padding) and `generated`: 8 greedy tokens by full re-evaluation (no cache),
                 so the windowed models attend past their window;
- blip2_opt/ + blip2_opt_io.npz: a tiny Blip2ForConditionalGeneration with an OPT language
  model and the 3D-LLM decoder-only forward computed row by row without padding:
    features + 0.01 * pos-embed(voxels) -> qformer(query_tokens) -> language_projection
    -> language_model(inputs_embeds=[queries; embed(prompt); embed(answer)])
  `logits[b, t]` scores answer_ids[b, t] (the output at the previous real token; zero where the
  answer is padding) and `generated` holds 6 greedy tokens after [queries; prompt].
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "goldens", "decoder"
)
VOCAB = 96
STD = 0.15
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
LLAMA = dict(COMMON, intermediate_size=48, initializer_range=STD, rms_norm_eps=1e-5)


def variants():
    return {
        "opt": (
            OPTForCausalLM,
            OPTConfig(
                **COMMON,
                ffn_dim=48,
                max_position_embeddings=64,
                init_std=STD,
                do_layer_norm_before=True,
                word_embed_proj_dim=32,
                pad_token_id=1,
            ),
        ),
        "opt_postln": (
            OPTForCausalLM,
            OPTConfig(
                **COMMON,
                ffn_dim=48,
                max_position_embeddings=64,
                init_std=STD,
                do_layer_norm_before=False,
                word_embed_proj_dim=16,
                pad_token_id=1,
            ),
        ),
        "llama3": (
            LlamaForCausalLM,
            LlamaConfig(
                **LLAMA,
                num_key_value_heads=2,
                max_position_embeddings=256,
                tie_word_embeddings=False,
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=10000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
            ),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(
                **LLAMA,
                num_key_value_heads=1,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                use_sliding_window=True,
                sliding_window=4,
                max_window_layers=1,
                rope_parameters=dict(rope_type="default", rope_theta=1e6),
            ),
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(
                **LLAMA,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
                tie_word_embeddings=False,
                sliding_window=5,
                rope_parameters=dict(rope_type="default", rope_theta=1e6),
            ),
        ),
    }


def perturb(model: torch.nn.Module) -> None:
    """Norm weights away from 1 and biases away from 0 (HF initialises them to exactly that)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layernorm" in name):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def lm_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, VOCAB, (2, 12)).astype(np.int64)
    attention_mask = np.ones((2, 12), np.int64)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = 1
    gen_prompt = rng.integers(3, VOCAB, (2, 10)).astype(np.int64)
    return dict(input_ids=input_ids, attention_mask=attention_mask, gen_prompt=gen_prompt)


def run_lm(model_cls, path: str, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = model_cls.from_pretrained(path, trust_remote_code=False, local_files_only=True).eval()
    eager = model_cls.from_pretrained(
        path, trust_remote_code=False, local_files_only=True, attn_implementation="eager"
    ).eval()
    ids = torch.from_numpy(io["input_ids"])
    mask = torch.from_numpy(io["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
        again = eager(input_ids=ids, attention_mask=mask).logits.numpy()
        valid = io["attention_mask"].astype(bool)
        np.testing.assert_allclose(again[valid], logits[valid], atol=1e-5)
        generated = torch.from_numpy(io["gen_prompt"])
        for _ in range(8):
            step = model(input_ids=generated).logits[:, -1]
            generated = torch.cat([generated, step.argmax(-1, keepdim=True)], dim=1)
    return dict(
        io,
        logits=logits.astype(np.float32),
        generated=generated.numpy()[:, io["gen_prompt"].shape[1] :].astype(np.int64),
    )


# ---------------------------------------------------------------------------------- BLIP-2 OPT
FEATURE_DIM = 28


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


def build_blip2_opt(path: str) -> None:
    torch.manual_seed(5)
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
    text = OPTConfig(**COMMON, ffn_dim=48, max_position_embeddings=64, init_std=STD, pad_token_id=1)
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
            elif name.startswith("language_model.") and name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def blip2_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    b, n, lp, la = 2, 10, 5, 6
    point_mask = np.ones((b, n), np.int64)
    point_mask[1, 7:] = 0
    prompt_mask = np.ones((b, lp), np.int64)
    prompt_mask[0, 3:] = 0
    answer_mask = np.ones((b, la), np.int64)
    answer_mask[1, 4:] = 0
    return dict(
        features=rng.standard_normal((b, n, FEATURE_DIM)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=point_mask,
        prompt_ids=(rng.integers(3, VOCAB, (b, lp)) * prompt_mask + 1 - prompt_mask),
        prompt_mask=prompt_mask,
        answer_ids=(rng.integers(3, VOCAB, (b, la)) * answer_mask + 1 - answer_mask),
        answer_mask=answer_mask,
    )


def blip2_forward(model, io: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    states = torch.from_numpy(io["features"] + 0.01 * position_embedding(io["voxels"], FEATURE_DIM))
    batch, la = io["answer_ids"].shape
    lm = model.language_model
    embed = lm.get_input_embeddings()
    logits = np.zeros((batch, la, lm.config.vocab_size), np.float32)
    generated = np.zeros((batch, 6), np.int64)
    with torch.no_grad():
        query_output = model.qformer(
            query_embeds=model.query_tokens.expand(batch, -1, -1),
            encoder_hidden_states=states,
            encoder_attention_mask=t["point_mask"],
        ).last_hidden_state
        projected = model.language_projection(query_output)
        for b in range(batch):
            prompt = t["prompt_ids"][b][t["prompt_mask"][b].bool()]
            answer = t["answer_ids"][b][t["answer_mask"][b].bool()]
            prefix = torch.cat([projected[b], embed(prompt)], dim=0)
            out = lm(inputs_embeds=torch.cat([prefix, embed(answer)])[None]).logits[0]
            start = len(prefix) - 1
            logits[b, : len(answer)] = out[start : start + len(answer)].numpy()
            tokens = []
            for _ in range(6):
                extra = embed(torch.tensor(tokens, dtype=torch.long)).reshape(-1, prefix.shape[1])
                step = lm(inputs_embeds=torch.cat([prefix, extra])[None]).logits[0, -1]
                tokens.append(int(step.argmax()))
            generated[b] = tokens
    return dict(io, query_output=query_output.numpy(), logits=logits, generated=generated)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (model_cls, config)) in enumerate(variants().items()):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        perturb(model)
        path = os.path.join(OUT, name)
        # The Llama 3 model goes out in shards (index file + 3 files) to test sharded reading.
        shard = "30KB" if name == "llama3" else "50MB"
        model.save_pretrained(path, max_shard_size=shard)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(path, extra)):
                os.remove(os.path.join(path, extra))
        io = run_lm(model_cls, path, lm_inputs(100 + seed))
        np.savez(os.path.join(OUT, f"{name}_io.npz"), **io)
        print(name, sorted(os.listdir(path)), "max |logit|", float(np.abs(io["logits"]).max()))
    path = os.path.join(OUT, "blip2_opt")
    build_blip2_opt(path)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(path, extra)):
            os.remove(os.path.join(path, extra))
    model = Blip2ForConditionalGeneration.from_pretrained(
        path, trust_remote_code=False, local_files_only=True
    ).eval()
    io = blip2_forward(model, blip2_inputs())
    np.savez(os.path.join(OUT, "blip2_opt_io.npz"), **io)
    with open(os.path.join(path, "config.json")) as f:
        text_type = json.load(f)["text_config"]["model_type"]
    print("blip2_opt", text_type, {k: v.shape for k, v in io.items()})


if __name__ == "__main__":
    main()
