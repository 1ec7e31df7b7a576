"""Golden `generate` outputs of HF transformers for tests/infer/test_generation_penalties.py.

    python tools/make_goldens_generation.py

in a separate venv with `pip install torch==2.13.0 transformers==5.25.0 safetensors numpy` (the
goldens were made with these; torch is never a dependency of the package).

Writes tests/goldens/generation/:
- tiny_t5/ : a tiny random FlanT5-layout T5 (gated-gelu, untied lm_head, 1 + 1 layers, vocab 32;
  the EOS row of lm_head scaled up so that EOS competes and answers end at different lengths);
- io.npz : the encoder inputs (a padded batch) and, per setting, `ids_<name>` int32
  [B, max_new_tokens] (the start token dropped; after the first EOS everything is pad, as our
  decoder writes it; transformers fills finished beams with EOS instead) and, for beam settings,
  `score_<name>` (transformers' `sequences_scores`);
- settings.json : per setting, the `transformers.generate` arguments and the equal
  `llm3d_jax.infer.decode.DecodeConfig` fields.

Every penalty setting must change some row against its plain counterpart (and each early_stopping
rule against another), or the test could not tell whether the option is applied: the script
checks that.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "goldens", "generation"
)
MAX_NEW = 10
EOS, PAD = 1, 0

TINY = dict(
    vocab_size=32,
    d_model=16,
    d_kv=8,
    d_ff=32,
    num_layers=1,
    num_decoder_layers=1,  # transformers 5 `generate` needs as many decoder as encoder layers
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)

# name -> (transformers.generate arguments, DecodeConfig fields, the setting it must differ from
# or None).
# LAVIS passes `min_length` (counted with the decoder start token: min_length L is
# min_new_tokens L - 1 for T5); `early_stopping` False is transformers' default.
GREEDY = dict(num_beams=1, do_sample=False)
SETTINGS = {
    "greedy": (GREEDY, dict(strategy="greedy"), None),
    "greedy_repetition": (
        dict(GREEDY, repetition_penalty=1.5),
        dict(strategy="greedy", repetition_penalty=1.5),
        "greedy",
    ),
    "greedy_reward": (
        dict(GREEDY, repetition_penalty=0.7),
        dict(strategy="greedy", repetition_penalty=0.7),
        "greedy",
    ),
    "greedy_ngram": (
        dict(GREEDY, no_repeat_ngram_size=2),
        dict(strategy="greedy", no_repeat_ngram_size=2),
        "greedy",
    ),
    "greedy_min_new": (
        dict(GREEDY, min_new_tokens=4),
        dict(strategy="greedy", min_new_tokens=4),
        "greedy",
    ),
    "greedy_min_length": (
        dict(GREEDY, min_length=6),
        dict(strategy="greedy", min_new_tokens=5),
        "greedy",
    ),
    "greedy_all": (
        dict(GREEDY, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=2),
        dict(strategy="greedy", repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=2),
        "greedy",
    ),
    "beam": (
        dict(num_beams=4, length_penalty=1.0, early_stopping=False),
        dict(strategy="beam", num_beams=4, length_penalty=1.0, early_stopping=False),
        None,
    ),
    # the released 3D-LLM's caption settings (lavis blip2_t5.generate, inference.py)
    "beam_release": (
        dict(num_beams=5, length_penalty=1.2, repetition_penalty=1.5, early_stopping=False),
        dict(
            strategy="beam",
            num_beams=5,
            length_penalty=1.2,
            repetition_penalty=1.5,
            early_stopping=False,
        ),
        "beam",
    ),
    "beam_ngram_min_never": (
        dict(
            num_beams=3,
            length_penalty=0.0,
            no_repeat_ngram_size=2,
            min_new_tokens=3,
            early_stopping="never",
        ),
        dict(
            strategy="beam",
            num_beams=3,
            length_penalty=0.0,
            no_repeat_ngram_size=2,
            min_new_tokens=3,
            early_stopping="never",
        ),
        "beam",
    ),
    "beam_negative_early": (
        dict(num_beams=4, length_penalty=-1.0, repetition_penalty=1.2, early_stopping=True),
        dict(
            strategy="beam",
            num_beams=4,
            length_penalty=-1.0,
            repetition_penalty=1.2,
            early_stopping=True,
        ),
        "beam",
    ),
    # the three early_stopping rules, on a length penalty where they disagree
    "beam_long_never": (
        dict(num_beams=2, length_penalty=2.0, early_stopping="never"),
        dict(strategy="beam", num_beams=2, length_penalty=2.0, early_stopping="never"),
        "beam",
    ),
    "beam_long_heuristic": (
        dict(num_beams=2, length_penalty=2.0, early_stopping=False),
        dict(strategy="beam", num_beams=2, length_penalty=2.0, early_stopping=False),
        "beam_long_never",
    ),
    "beam_long_early": (
        dict(num_beams=2, length_penalty=2.0, early_stopping=True),
        dict(strategy="beam", num_beams=2, length_penalty=2.0, early_stopping=True),
        "beam_long_heuristic",
    ),
}


def make_model(path: str) -> None:
    torch.manual_seed(0)
    config = T5Config(
        **TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0
    )
    model = T5ForConditionalGeneration(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name in state:
        if "layer_norm" in name:  # HF initialises them to ones: make a wrong mapping show
            state[name] = 1.0 + 0.2 * torch.randn_like(state[name])
    head = torch.randn(TINY["vocab_size"], TINY["d_model"]) * TINY["d_model"] ** -0.5
    head[EOS] *= 2.5
    head[PAD] *= 2.0  # the start token competes too: the penalties must count it
    state["lm_head.weight"] = head
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(k, None)
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    released_layout = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        **TINY,
        "dropout_rate": 0.0,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(released_layout, f, indent=2)


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    input_ids = rng.integers(2, TINY["vocab_size"], (6, 8)).astype(np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    attention_mask[4, 3:] = 0
    input_ids[attention_mask == 0] = PAD
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def normalise(sequences: np.ndarray) -> np.ndarray:
    """[B, 1 + n] with the start token -> [B, MAX_NEW], pad after the first EOS."""
    ids = sequences[:, 1:]
    out = np.full((len(ids), MAX_NEW), PAD, np.int32)
    for row, seq in zip(out, ids):
        for i, tok in enumerate(seq):
            row[i] = tok
            if tok == EOS:
                break
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "tiny_t5")
    make_model(path)
    model = T5ForConditionalGeneration.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    ).eval()
    io = inputs()
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    out, table = dict(io), {}
    for name, (hf_args, ours, other) in SETTINGS.items():
        with torch.no_grad():
            result = model.generate(
                **t,
                max_new_tokens=MAX_NEW,
                return_dict_in_generate=True,
                output_scores=True,
                **hf_args,
            )
        out[f"ids_{name}"] = normalise(result.sequences.numpy())
        if hf_args.get("num_beams", 1) > 1:
            out[f"score_{name}"] = result.sequences_scores.numpy().astype(np.float32)
        table[name] = dict(transformers=hf_args, decode=ours, differs_from=other)
        lengths = (out[f"ids_{name}"] != PAD).sum(1)
        print(name, "lengths", lengths.tolist())
    for name, (_, _, other) in SETTINGS.items():
        if other is not None and np.array_equal(out[f"ids_{name}"], out[f"ids_{other}"]):
            raise SystemExit(f"setting {name} changes nothing against {other}: pick other values")
    np.savez(os.path.join(OUT, "io.npz"), **out)
    with open(os.path.join(OUT, "settings.json"), "w") as f:
        json.dump(dict(max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, settings=table), f, indent=2)


if __name__ == "__main__":
    main()
