"""Pixel-aligned 2D features, ConceptFusion-style, as 3D-LLM builds them (docs/reference.md).

Per frame, with masks m_1..m_K (instance renders by default, or an external segmenter's file):
  f_G = pooled feature of the whole frame, f_i = pooled feature of the crop of mask i (its
  bounding box, resized to the encoder's input size), both from the same ViT and L2-normalised;
  with `masked=True` the crop shows only mask i's pixels, the rest of its box painted the
  encoder's mean colour (zero once normalised), so neighbours in the box do not leak in;
  w_i = softmax_i( cos(f_G, f_i) - mean_j cos(f_i, f_j) )   (j over all K masks of the frame)
  g_i = normalize( w_i f_G + (1 - w_i) f_i )
A pixel gets normalize(sum of g_i over the masks covering it); uncovered pixels get nothing and
are dropped by every lifting method. "Pooled" = mean of the ViT's patch tokens (the class token
excluded), so the BLIP-2 and CLIP layouts pool the same way. Frames and crops are resized
(stretched, antialiased) to the encoder's square input inside one jitted function, in fixed-size
batches, so a scene compiles once.

Storage is compact (docs/architecture.md, "Pixel-aligned 2D features"): a mask-id map int32
[V,H,W] indexing one float32 table [K,D] for the whole view set (-1 = uncovered). Pixels covered
by the same set of masks share one row, so overlapping masks cost one row per distinct overlap,
and memory never holds an H x W x D map.

Mask file (external segmenter, e.g. SAM): `<dir>/<scene_id>.npz` with key `masks`, either
  bool/uint8 [V,M,H,W]  M binary masks per view (may overlap; all-zero slots are padding), or
  int [V,H,W]           a label map per view, -1 = no mask (non-overlapping masks);
V, H, W must equal the views'. Anything else is an InputError naming the file.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm3d_jax.fileio import InputError, load_npz
from llm3d_jax.model.vit import ViT, normalize_images


@dataclasses.dataclass
class PixelFeatures:
    """mask_ids int32 [V,H,W] (row of `table`, -1 = uncovered); table float32 [K,D], unit rows."""

    mask_ids: np.ndarray
    table: np.ndarray

    @property
    def dim(self) -> int:
        return self.table.shape[1]


# ---------------------------------------------------------------- encoder
def crop_boxes(frames, frame_idx, boxes, size: int):
    """Crops boxes [B,4] (y0, x0, y1, x1 in pixel-edge coordinates) of frames [V,H,W,3] uint8
    and resizes each (stretched, antialiased) to size x size: -> float32 [B,size,size,3], 0..255."""

    def crop(index, box):
        scale = size / jnp.maximum(box[2:] - box[:2], 1.0)
        return jax.image.scale_and_translate(
            frames[index].astype(jnp.float32),
            (size, size, 3),
            (0, 1),
            scale,
            -box[:2] * scale,
            "linear",
            antialias=True,
        )

    return jax.vmap(crop)(frame_idx, boxes)


def pooled_features(module: ViT, params, images):
    """images [B,S,S,3] (0..255) -> ViT -> mean of the patch tokens (the class token excluded),
    unit length: -> float32 [B,D]. The one pooling of the pipeline (and of tools/train_encoder)."""
    tokens = module.apply({"params": params}, normalize_images(images, module.config))
    pooled = tokens[:, 1:].astype(jnp.float32).mean(axis=1)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def mask_background(frames: np.ndarray, frame_idx, masks: np.ndarray, config) -> np.ndarray:
    """frames uint8 [V,H,W,3], masks bool [N,H,W] -> uint8 [N,H,W,3]: frame frame_idx[n] with the
    pixels outside mask n painted the encoder's mean colour (zero after `normalize_images`)."""
    mean = np.round(255 * np.asarray(config.image_mean)).astype(np.uint8)
    return np.where(masks[..., None], frames[np.asarray(frame_idx)], mean)


@functools.partial(jax.jit, static_argnums=0)
def _encode_boxes(module: ViT, params, frames, frame_idx, boxes):
    """crop_boxes -> pooled_features: -> unit features [B,D]."""
    images = crop_boxes(frames, frame_idx, boxes, module.config.image_size)
    return pooled_features(module, params, images)


def encode_boxes(
    module: nn.Module,
    params,
    frames: np.ndarray,
    frame_idx: np.ndarray,
    boxes: np.ndarray,
    batch_size: int = 16,
    masks: np.ndarray | None = None,
) -> np.ndarray:
    """Pooled unit features [N,D] of N boxes, in fixed-size batches (one compilation). With
    masks bool [N,H,W], box n is cropped from `mask_background` of its frame and mask n."""
    all_frames = jnp.asarray(frames) if masks is None else None  # masked: per-batch frames
    n = len(frame_idx)
    out = []
    for start in range(0, n, batch_size):
        idx = np.zeros(batch_size, np.int32)
        box = np.tile(np.array([0, 0, 1, 1], np.float32), (batch_size, 1))
        stop = min(n, start + batch_size)
        idx[: stop - start] = frame_idx[start:stop]
        box[: stop - start] = boxes[start:stop]
        source = all_frames
        if masks is not None:  # one masked frame per box of the batch (padding: frame 0 whole)
            batch_masks = np.ones((batch_size, *frames.shape[1:3]), bool)
            batch_masks[: stop - start] = masks[start:stop]
            source = mask_background(frames, idx, batch_masks, module.config)
            idx = np.arange(batch_size, dtype=np.int32)
        out.append(np.asarray(_encode_boxes(module, params, source, idx, box))[: stop - start])
    dim = module.config.hidden_size
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


# ---------------------------------------------------------------- masks
def instance_masks(instance: np.ndarray, depth: np.ndarray | None = None) -> list[np.ndarray]:
    """Default masks from renders: one per instance id seen in a view, and one for the structure
    (id -1), so floors and walls keep features. With `depth`, pixels without a hit (depth 0) are
    uncovered; without it (RGB only) every pixel is covered.
    instance [V,H,W] (+ depth [V,H,W]) -> per view bool [M_v,H,W]."""
    none = np.iinfo(np.int32).min
    masks = []
    for k, inst in enumerate(instance):
        labels = inst if depth is None else np.where(depth[k] > 0, inst, none)
        ids = np.unique(labels)
        ids = ids[ids != none]
        masks.append(labels[None] == ids[:, None, None])
    return masks


def load_mask_file(path: str, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """An external segmenter's masks (format in the module docstring) -> per view bool [M,H,W]."""
    masks = load_npz(path, required=("masks",))["masks"]
    v, h, w = shape
    if masks.ndim == 3 and masks.dtype.kind in "iu":
        if masks.shape != (v, h, w):
            raise InputError(path, f"masks label map has shape {masks.shape}, expected {(v, h, w)}")
        out = []
        for labels in masks:
            ids = np.unique(labels[labels >= 0])
            out.append(labels[None] == ids[:, None, None])
        return out
    if masks.ndim == 4 and masks.dtype.kind in "bu":
        if (masks.shape[0], *masks.shape[2:]) != (v, h, w):
            raise InputError(
                path, f"masks has shape {masks.shape}, expected [{v}, M, {h}, {w}] for these views"
            )
        out = []
        for stack in masks.astype(bool):
            out.append(stack[stack.reshape(len(stack), -1).any(axis=1)])
        return out
    raise InputError(
        path,
        f"masks must be bool [V,M,H,W] or an int label map [V,H,W], got {masks.dtype} {masks.shape}",
    )


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """bool [M,H,W] -> float32 [M,4] bounding boxes (y0, x0, y1, x1), pixel-edge coordinates."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    return np.stack([y0, x0, y1, x1], axis=1).astype(np.float32)


# ---------------------------------------------------------------- ConceptFusion weighting
def fuse_mask_features(global_feature: np.ndarray, local: np.ndarray) -> np.ndarray:
    """f_G [D] and unit crop features f_i [K,D] -> unit mask features g_i [K,D]."""
    if len(local) == 0:
        return local
    f_g = global_feature / max(np.linalg.norm(global_feature), 1e-12)
    to_global = local @ f_g  # cos(f_G, f_i)
    uniqueness = (local @ local.T).mean(axis=1)  # mean_j cos(f_i, f_j)
    score = to_global - uniqueness
    w = np.exp(score - score.max())
    w = (w / w.sum())[:, None]
    g = w * f_g[None] + (1 - w) * local
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def _coverage_rows(masks: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [M,H,W] + mask features [M,D] -> (row map int32 [H,W], -1 = uncovered; rows [U,D]):
    one row per distinct set of covering masks, normalize(sum of their g_i)."""
    m, h, w = masks.shape
    if m == 0:
        return np.full((h, w), -1, np.int32), np.zeros((0, g.shape[1]), np.float32)
    bits = np.ascontiguousarray(np.packbits(masks.reshape(m, -1), axis=0).T)  # [HW, ceil(M/8)]
    combos, inverse = np.unique(bits, axis=0, return_inverse=True)
    covering = np.unpackbits(combos, axis=1, count=m).astype(np.float32)  # [U, M]
    rows = covering @ g
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    covered = covering.any(axis=1)
    rows = rows / np.maximum(norm, 1e-12)
    # Renumber so that only covered combinations get rows.
    new_index = np.where(covered, np.cumsum(covered) - 1, -1).astype(np.int32)
    return new_index[inverse.reshape(-1)].reshape(h, w), rows[covered].astype(np.float32)


def pixel_features(
    module: nn.Module,
    params,
    rgb: np.ndarray,
    masks: list[np.ndarray],
    batch_size: int = 16,
    masked: bool = False,
) -> PixelFeatures:
    """rgb uint8 [V,H,W,3] + per-view masks bool [M_v,H,W] -> PixelFeatures (one table).
    masked: crop each mask's box with the pixels outside the mask painted out (module docstring)."""
    v, h, w, _ = rgb.shape
    if len(masks) != v:
        raise ValueError(f"{len(masks)} mask stacks for {v} views")
    frame_idx = [np.arange(v)]
    boxes = [np.tile(np.array([0, 0, h, w], np.float32), (v, 1))]  # whole frames first
    crop_masks = [np.ones((v, h, w), bool)]
    for k, stack in enumerate(masks):
        frame_idx.append(np.full(len(stack), k))
        boxes.append(mask_boxes(stack))
        crop_masks.append(stack)
    features = encode_boxes(
        module,
        params,
        rgb,
        np.concatenate(frame_idx),
        np.concatenate(boxes),
        batch_size,
        np.concatenate(crop_masks) if masked else None,
    )
    global_features, local = features[:v], features[v:]
    mask_ids = np.full((v, h, w), -1, np.int32)
    tables, offset, start = [], 0, 0
    for k, stack in enumerate(masks):
        g = fuse_mask_features(global_features[k], local[start : start + len(stack)])
        start += len(stack)
        rows_map, rows = _coverage_rows(stack, g)
        mask_ids[k] = np.where(rows_map >= 0, rows_map + offset, -1)
        tables.append(rows)
        offset += len(rows)
    table = np.concatenate(tables) if tables else np.zeros((0, features.shape[1]), np.float32)
    return PixelFeatures(mask_ids=mask_ids, table=table)
