"""Writes the ViT parity goldens (run with the torch venv, never needed by the tests themselves):

    /work/torchenv/bin/python tools/make_goldens_vit.py

Also writes the released-3D-LLM-features fixture (tests/goldens/vit/released/, see
`released_fixture`). For tiny random configs of transformers' PyTorch `Blip2VisionModel`, `CLIPVisionModel`, a full
`Blip2ForConditionalGeneration` and a full `CLIPModel` it saves the HF directory (config.json +
model.safetensors) under tests/goldens/vit/<name>/ and, in tests/goldens/vit/outputs.npz, the
input images (NHWC, already normalised) and each tower's `last_hidden_state`.
Every parameter is randomised (LayerNorms included), so a wrong mapping cannot hide behind
default initialisations.
"""

import os

import numpy as np
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "goldens", "vit"
)
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if id(p) in norm_scales else noise)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    pixels = torch.from_numpy(
        np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    )
    outputs = {"pixel_values": pixels.permute(0, 2, 3, 1).numpy()}

    models = {
        "blip2_vision": Blip2VisionModel(Blip2VisionConfig(**TINY, qkv_bias=True)),
        "clip_vision": CLIPVisionModel(CLIPVisionConfig(**TINY)),
        "blip2_full": Blip2ForConditionalGeneration(
            Blip2Config(
                vision_config=dict(TINY, qkv_bias=True),
                qformer_config=dict(
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=64,
                    encoder_hidden_size=32,
                    vocab_size=50,
                ),
                text_config=dict(
                    model_type="opt",
                    vocab_size=50,
                    hidden_size=16,
                    num_hidden_layers=1,
                    ffn_dim=32,
                    num_attention_heads=2,
                    max_position_embeddings=64,
                    word_embed_proj_dim=16,
                ),
                num_query_tokens=4,
            )
        ),
        "clip_full": CLIPModel(
            CLIPConfig(
                vision_config=TINY,
                text_config=dict(
                    vocab_size=50,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    max_position_embeddings=16,
                ),
                projection_dim=8,
            )
        ),
    }
    for seed, (name, model) in enumerate(models.items()):
        randomise(model, seed + 1)
        model.eval()
        model.save_pretrained(os.path.join(OUT, name))
        tower = model.vision_model if name.endswith("_full") else model
        with torch.no_grad():
            hidden = tower(pixel_values=pixels).last_hidden_state
        outputs[name] = hidden.numpy()
        print(name, tuple(hidden.shape), float(hidden.abs().mean()))
    np.savez(os.path.join(OUT, "outputs.npz"), **outputs)
    released_fixture()


def released_fixture() -> None:
    """A tiny scene in the layout of the released 3D-LLM features (for data_pipeline.released):
    released/features/scene0000_00.pt (torch.save of a [40,16] tensor) and
    released/voxels/scene0000_00.npy (int64 [40,3] voxel coordinates); row 3 is all zero."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(40, 16)).astype(np.float32)
    features[3] = 0
    voxels = rng.integers(0, 256, size=(40, 3))
    for sub in ("features", "voxels"):
        os.makedirs(os.path.join(OUT, "released", sub), exist_ok=True)
    torch.save(
        torch.from_numpy(features), os.path.join(OUT, "released", "features", "scene0000_00.pt")
    )
    np.save(os.path.join(OUT, "released", "voxels", "scene0000_00.npy"), voxels)
    np.savez(os.path.join(OUT, "released", "expected.npz"), features=features, voxels=voxels)


if __name__ == "__main__":
    main()
