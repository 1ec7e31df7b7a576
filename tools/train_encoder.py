"""Pretrains the demo's tiny ViT to name what it sees: the stand-in for BLIP-2's ViT in `make demo`.

3D-LLM lifts features of a 2D encoder that was pretrained to align images with language, so an
object's lifted feature already says what the object is. A random ViT says little more than its
colour (tools/probe_features.py: category 28.8% held-out, majority 17.2%), and a 3D-LLM trained
from scratch on 48 rooms cannot learn the rest. This script gives the demo's encoder that
pretraining, in small: synthetic rooms of *another* seed than the demo's are rendered, every
object's mask box is cropped as the feature pipeline crops it with `--masked-crops`
(`features2d.mask_background`, then `features2d.crop_boxes`: only the object's own pixels, the
rest of its box painted the encoder's mean colour), and the ViT's pooled feature
(`features2d.pooled_features`, as the pipeline pools) is trained to give the object's category
(walls and floor are a 13th class) and colour through two linear read-outs. Only the ViT is
kept. Its shape is the demo's `ViTConfig.tiny(64)` (32x32 crops, 8x8 patches) with 4 blocks.

    python -m tools.train_encoder --out DIR [--scenes 1536] [--seed 1000] [--steps 8000]

DIR gets the ViT (`loading.save_trained_vit`: `config.json`, `model.safetensors`) and `report.json`
(train / held-out accuracy per read-out; held-out = the last 1/8 of the rooms).
`python -m data_pipeline.features --encoder vit:DIR --masked-crops` then uses it. With the
defaults (as tools/pretrain_demo.py runs it, assets/demo/encoder/report.json): 835 s on 2 CPU
cores, held-out category 84.7% (majority 17.4%), colour 99.6%. Throwaway runs (grey fill),
384 rooms and 3000 steps: box crops with 2 blocks 66.2%, masked crops 75.3%; 1536 rooms and
8000 steps, masked: 2 blocks 82.4%, 4 blocks 85.4%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from data_pipeline import features2d
from data_pipeline.render import render_scene
from data_pipeline.scenes.synthetic import CATEGORIES, COLORS, make_scene
from llm3d_jax import loading
from llm3d_jax.fileio import write_text_atomic
from llm3d_jax.model import vit

STRUCTURE = len(CATEGORIES)  # category index of walls and floor (instance id -1)
LOGIT_SCALE = 16.0  # the read-outs see the unit-length pooled feature times this


def object_crops(num_scenes: int, seed: int, views: int, config: vit.ViTConfig):
    """-> (crops uint8 [N,S,S,3], category int32 [N], colour int32 [N] (-1: none), room int32
    [N]): one masked crop per mask per view, masks and crops as the feature pipeline makes them
    with --masked-crops (S = config.image_size)."""
    categories, colours = list(CATEGORIES), list(COLORS)
    crops, category, colour, room = [], [], [], []
    crop = jax.jit(features2d.crop_boxes, static_argnums=3)
    for index in tqdm(range(num_scenes), desc="render + crop", unit="room"):
        scene = make_scene(seed, index)
        rendered = render_scene(scene, views, seed=seed)
        labels = {o.id: (categories.index(o.label), colours.index(o.color)) for o in scene.objects}
        for v, masks in enumerate(features2d.instance_masks(rendered.instance, rendered.depth)):
            ids = [int(rendered.instance[v][m].flat[0]) for m in masks]
            boxes = features2d.mask_boxes(masks)
            masked = features2d.mask_background(rendered.rgb, np.full(len(masks), v), masks, config)
            images = crop(masked, np.arange(len(masks), dtype=np.int32), boxes, config.image_size)
            crops.append(np.asarray(jnp.clip(jnp.round(images), 0, 255), np.uint8))
            for i in ids:
                cat, col = labels.get(i, (STRUCTURE, -1))
                category.append(cat)
                colour.append(col)
                room.append(index)
    return (
        np.concatenate(crops),
        np.array(category, np.int32),
        np.array(colour, np.int32),
        np.array(room, np.int32),
    )


def train(crops, category, colour, config: vit.ViTConfig, steps: int, seed: int, batch: int = 128):
    """-> params {"vit", "category", "colour"} (the ViT and its two linear read-outs): AdamW on
    the two cross-entropies, colour only where the crop has one."""
    module = vit.ViT(config)
    rng = jax.random.key(seed)
    params = {
        "vit": vit.init_params(config, seed),
        "category": jax.random.normal(rng, (config.hidden_size, STRUCTURE + 1)) * 0.01,
        "colour": jax.random.normal(jax.random.fold_in(rng, 1), (config.hidden_size, len(COLORS)))
        * 0.01,
    }
    warmup = min(50, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1), 1e-4)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    state = optimizer.init(params)

    def loss_fn(params, images, cat, col):
        feature = LOGIT_SCALE * features2d.pooled_features(module, params["vit"], images)
        cat_loss = optax.softmax_cross_entropy_with_integer_labels(
            feature @ params["category"], cat
        )
        col_loss = optax.softmax_cross_entropy_with_integer_labels(
            feature @ params["colour"], jnp.maximum(col, 0)
        )
        has_colour = (col >= 0).astype(jnp.float32)
        return cat_loss.mean() + (col_loss * has_colour).sum() / jnp.maximum(has_colour.sum(), 1)

    @jax.jit
    def step(params, state, images, cat, col):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, cat, col)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    order = np.random.default_rng(seed)
    with tqdm(range(steps), desc="train encoder", unit="step") as bar:
        for i in bar:
            pick = order.integers(0, len(crops), batch)
            images = crops[pick]
            flip = order.random(batch) < 0.5  # mirror images: a chair is a chair both ways
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            params, state, loss = step(params, state, images, category[pick], colour[pick])
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    return params


def accuracy(module, params, crops, category, colour) -> dict[str, float]:
    """Read-out accuracy (%) of category and colour (colour over the crops that have one)."""
    predict = jax.jit(
        lambda images: LOGIT_SCALE * features2d.pooled_features(module, params["vit"], images)
    )
    feature = np.concatenate([predict(crops[i : i + 256]) for i in range(0, len(crops), 256)])
    cat_ok = (feature @ np.asarray(params["category"])).argmax(1) == category
    has = colour >= 0
    col_ok = (feature[has] @ np.asarray(params["colour"])).argmax(1) == colour[has]
    majority = np.bincount(category).max() / len(category)
    return {
        "category": round(100 * float(cat_ok.mean()), 1),
        "colour": round(100 * float(col_ok.mean()), 1),
        "category_majority": round(100 * float(majority), 1),
        "crops": int(len(crops)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenes", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=1000, help="rooms of this seed (demo: 0)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--width", type=int, default=64, help="ViTConfig.tiny(width)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (tiny: 2)")
    args = parser.parse_args(argv)
    if args.scenes < 2 or args.steps < 1:
        parser.error("--scenes must be >= 2 and --steps >= 1")
    start = time.time()
    # The tiny shape (32x32 crops, 8x8 patches: the demo's feature cost) made deeper, with the
    # usual 4x MLP: 4 blocks reach 85% held-out category where 2 reach 82% (1536 rooms).
    config = dataclasses.replace(
        vit.ViTConfig.tiny(args.width), num_layers=args.layers, intermediate_size=4 * args.width
    )
    crops, category, colour, room = object_crops(args.scenes, args.seed, args.views, config)
    held_out = room >= args.scenes - max(1, args.scenes // 8)
    params = train(
        crops[~held_out], category[~held_out], colour[~held_out], config, args.steps, args.seed
    )
    module = vit.ViT(config)
    report = {
        "train": accuracy(module, params, crops[~held_out], category[~held_out], colour[~held_out]),
        "held_out": accuracy(module, params, crops[held_out], category[held_out], colour[held_out]),
        "scenes": args.scenes,
        "seed": args.seed,
        "steps": args.steps,
        "seconds": round(time.time() - start, 1),
    }
    loading.save_trained_vit(args.out, config, params["vit"])
    write_text_atomic(os.path.join(args.out, "report.json"), json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
