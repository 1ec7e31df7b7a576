"""Neural field (3D-CLR style): a voxel grid of density, colour and feature, volume-rendered along
the camera rays and fitted with optax (MSE) to the views' colours and 2D features. RGB only: the
depth maps are never read, the geometry comes from the fitted density.

Grid: `resolution` cells along the scene's largest extent, values at cell centres, trilinear
interpolation. Along a ray (the renderer's pixel-centre rays, clipped to the scene box) with S
samples: sigma = softplus(raw - 4) / cell, alpha_s = 1 - exp(-sigma_s delta), w_s = alpha_s prod_{j<s}
(1 - alpha_j), colour = sum_s w_s sigmoid(c_s); the last sample is opaque (no background colour
that partial opacity could mix with to fake darker colours). The grid covers the scene box plus
a `margin`, so walls on the box faces are inside it.

Two fits with Adam:
1. density + colour against the RGB pixels (+ `tv_weight` x total variation of the density);
2. features on the fitted geometry (weights frozen): a feature table over the "active" cells (the
   trilinear support of the rendered surface points), rendered from each ray's `top_k` heaviest
   samples (their weights renormalised to sum to 1) and fitted to the pixel's mask feature, so
   memory is (active cells) x D, not grid x D.
Points: each covered pixel (every `point_stride`-th) whose ray stops before the far end of the
grid (weight of the last sample < 0.5) gives its expected-termination point, kept when inside
the scene box; colour = rendered colour, feature = the feature field there,
instance = the pixel's instance id.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift import LiftedPoints

DENSITY_SHIFT = 4.0


@functools.cache
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimizer object per rate, so the jitted steps compile once, not once per scene."""
    return optax.adam(learning_rate)


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    resolution: int = 48
    samples_per_ray: int = 96
    rays_per_step: int = 2048
    steps: int = 400
    feature_steps: int = 200
    learning_rate: float = 0.1
    feature_learning_rate: float = 0.1
    top_k: int = 4
    point_stride: int = 2
    near: float = 0.05
    margin: float = 0.1  # of the largest extent, on every side of the scene box
    tv_weight: float = 1e-3  # total variation of the density: fewer floaters
    seed: int = 0

    @classmethod
    def tiny(cls) -> FieldConfig:
        return cls(
            resolution=16, samples_per_ray=32, rays_per_step=512, steps=150, feature_steps=80
        )


@dataclasses.dataclass
class FieldFit:
    """The fitted field and how the fit went (losses per step)."""

    lo: np.ndarray
    cell: float
    density: np.ndarray  # [X,Y,Z] raw
    color: np.ndarray  # [X,Y,Z,3] logits
    color_losses: np.ndarray
    feature_losses: np.ndarray


def pixel_rays(K, cam_to_world, h, w):
    """Unit world rays of every pixel (pixel centres): origins [V*H*W,3], directions [V*H*W,3]."""
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    d_cam = np.einsum("vij,nj->vni", np.linalg.inv(np.asarray(K, np.float64)), pix)
    pose = np.asarray(cam_to_world, np.float64)
    d = np.einsum("vij,vnj->vni", pose[:, :3, :3], d_cam)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(pose[:, None, :3, 3], d.shape)
    return o.reshape(-1, 3).astype(np.float32), d.reshape(-1, 3).astype(np.float32)


def _trilinear_corners(x, lo, cell, shape):
    """Points [...,3] -> flat corner indices [...,8] and weights [...,8] (cell-centre grid)."""
    dims = jnp.asarray(shape)
    u = (x - lo) / cell - 0.5
    i0 = jnp.clip(jnp.floor(u), 0, dims - 2).astype(jnp.int32)
    f = jnp.clip(u - i0, 0.0, 1.0)
    idx, wts = [], []
    for cx in (0, 1):
        for cy in (0, 1):
            for cz in (0, 1):
                i = i0 + jnp.array([cx, cy, cz])
                idx.append((i[..., 0] * shape[1] + i[..., 1]) * shape[2] + i[..., 2])
                wx = f[..., 0] if cx else 1 - f[..., 0]
                wy = f[..., 1] if cy else 1 - f[..., 1]
                wz = f[..., 2] if cz else 1 - f[..., 2]
                wts.append(wx * wy * wz)
    return jnp.stack(idx, -1), jnp.stack(wts, -1)


def _samples(origins, dirs, lo, hi, near, num, jitter):
    """Sample distances [B,S] inside the scene box and their spacing [B]."""
    safe = jnp.where(jnp.abs(dirs) < 1e-9, 1e-9, dirs)
    t0, t1 = (lo - origins) / safe, (hi - origins) / safe
    t_near = jnp.maximum(jnp.max(jnp.minimum(t0, t1), -1), near)
    t_far = jnp.maximum(jnp.min(jnp.maximum(t0, t1), -1), t_near)
    delta = (t_far - t_near) / num
    t = t_near[:, None] + (jnp.arange(num) + jitter) * delta[:, None]
    return t, delta


def _weights(density, origins, dirs, lo, hi, cell, near, num, jitter):
    """Render weights [B,S], sample distances [B,S] and corner lookups of the samples."""
    t, delta = _samples(origins, dirs, lo, hi, near, num, jitter)
    x = origins[:, None] + t[..., None] * dirs[:, None]
    idx, wts = _trilinear_corners(x, lo, cell, density.shape)
    raw = jnp.sum(density.reshape(-1)[idx] * wts, -1)
    # Density per cell length: a raw value of a few units makes one cell opaque, so Adam can
    # form sharp surfaces in tens of steps instead of spreading colour through fog.
    sigma = jax.nn.softplus(raw - DENSITY_SHIFT) / cell
    alpha = 1.0 - jnp.exp(-sigma * delta[:, None])
    # The last sample takes what is left: no background colour for partial opacity to mix with.
    alpha = alpha.at[:, -1].set(1.0)
    trans = jnp.cumprod(jnp.concatenate([jnp.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    return trans * alpha, t, idx, wts


def _render_color(params, origins, dirs, lo, hi, cell, near, num, jitter):
    w, t, idx, wts = _weights(params["density"], origins, dirs, lo, hi, cell, near, num, jitter)
    logits = jnp.sum(params["color"].reshape(-1, 3)[idx] * wts[..., None], -2)
    rgb = jnp.sum(w[..., None] * jax.nn.sigmoid(logits), 1)
    return rgb, w, t


@functools.partial(jax.jit, static_argnames=("num", "batch", "near", "cell", "tx", "tv_weight"))
def _color_step(
    params,
    opt_state,
    key,
    rays_o,
    rays_d,
    rays_rgb,
    lo,
    hi,
    *,
    cell,
    near,
    num,
    batch,
    tx,
    tv_weight,
):
    k1, k2 = jax.random.split(key)
    pick = jax.random.randint(k1, (batch,), 0, rays_o.shape[0])
    jitter = jax.random.uniform(k2, (batch, num))

    def loss_fn(p):
        rgb, _, _ = _render_color(p, rays_o[pick], rays_d[pick], lo, hi, cell, near, num, jitter)
        return jnp.mean((rgb - rays_rgb[pick]) ** 2) + tv_weight * _tv(p["density"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _tv(grid):
    """Mean squared difference of neighbouring cells: keeps free space free of floaters."""
    return sum(jnp.mean(jnp.diff(grid, axis=a) ** 2) for a in range(3))


def _feature_at(feats, lookup, x, lo, cell, shape):
    """Feature field at points x [...,3]: trilinear over the active cells (inactive = 0)."""
    idx, wts = _trilinear_corners(x, lo, cell, shape)
    active = lookup[idx]
    rows = jnp.where(active[..., None] >= 0, feats[jnp.maximum(active, 0)], 0.0)
    return jnp.sum(rows * wts[..., None], -2)


@functools.partial(jax.jit, static_argnames=("num", "batch", "near", "cell", "top_k", "tx"))
def _feature_step(
    feats,
    opt_state,
    key,
    density,
    lookup,
    rays_o,
    rays_d,
    targets,
    lo,
    hi,
    *,
    cell,
    near,
    num,
    batch,
    top_k,
    tx,
):
    pick = jax.random.randint(key, (batch,), 0, rays_o.shape[0])
    o, d = rays_o[pick], rays_d[pick]
    w, t, _, _ = _weights(density, o, d, lo, hi, cell, near, num, 0.5)
    w_top, s_top = jax.lax.top_k(w, top_k)
    # The surface's share of the ray: renormalised, so a half-transparent fit still aims at f.
    w_top = w_top / jnp.maximum(jnp.sum(w_top, 1, keepdims=True), 1e-6)
    x = o[:, None] + jnp.take_along_axis(t, s_top, 1)[..., None] * d[:, None]

    def loss_fn(f):
        f_at = _feature_at(f, lookup, x, lo, cell, density.shape)
        rendered = jnp.sum(w_top[..., None] * f_at, 1)
        return jnp.mean(jnp.sum((rendered - targets[pick]) ** 2, -1))

    loss, grads = jax.value_and_grad(loss_fn)(feats)
    updates, opt_state = tx.update(grads, opt_state, feats)
    return optax.apply_updates(feats, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("num", "near", "cell"))
def _render_surface(params, rays_o, rays_d, lo, hi, *, cell, near, num):
    rgb, w, t = _render_color(params, rays_o, rays_d, lo, hi, cell, near, num, 0.5)
    depth = jnp.sum(w * t, 1)
    # Opacity in front of the far end of the grid: low when the ray found no surface.
    return rgb, 1.0 - w[:, -1], rays_o + depth[:, None] * rays_d


def lift_neural_field(
    views,
    pixels: PixelFeatures,
    bounds: tuple[np.ndarray, np.ndarray],
    config: FieldConfig = FieldConfig(),
) -> tuple[LiftedPoints, FieldFit]:
    """Fits the field to views.rgb (+ pixel features) with the views' cameras; depth unused."""
    cfg = config
    v, h, w, _ = views.rgb.shape
    # A margin around the scene box, so walls on its faces sit inside the grid, not on its edge
    # (there a ray can only fade out into the background, and partial opacity fakes dark colours).
    margin = cfg.margin * float(np.max(np.asarray(bounds[1]) - np.asarray(bounds[0])))
    lo = np.asarray(bounds[0], np.float32) - margin
    hi = np.asarray(bounds[1], np.float32) + margin
    cell = float(np.max(hi - lo)) / cfg.resolution
    shape = tuple(int(s) for s in np.maximum(np.ceil((hi - lo) / cell), 2))
    rays_o, rays_d = pixel_rays(views.K, views.cam_to_world, h, w)
    rays_rgb = views.rgb.reshape(-1, 3).astype(np.float32) / 255.0
    lo_j, hi_j = jnp.asarray(lo), jnp.asarray(hi)
    key = jax.random.key(cfg.seed)

    # 1. density + colour from RGB.
    params = {"density": jnp.zeros(shape), "color": jnp.zeros((*shape, 3))}
    tx = _adam(cfg.learning_rate)
    opt_state = tx.init(params)
    dev_o, dev_d, dev_rgb = jnp.asarray(rays_o), jnp.asarray(rays_d), jnp.asarray(rays_rgb)
    color_losses = []
    for _ in range(cfg.steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = _color_step(
            params, opt_state, sub, dev_o, dev_d, dev_rgb, lo_j, hi_j,
            cell=cell, near=cfg.near, num=cfg.samples_per_ray, batch=cfg.rays_per_step, tx=tx,
            tv_weight=cfg.tv_weight,
        )  # fmt: skip
        color_losses.append(loss)

    # Surface points of the covered pixels (every point_stride-th row and column).
    ys, xs = np.arange(0, h, cfg.point_stride), np.arange(0, w, cfg.point_stride)
    grid_pix = (ys[:, None] * w + xs[None, :]).reshape(-1)
    pix = (np.arange(v)[:, None] * h * w + grid_pix[None]).reshape(-1)
    rows = pixels.mask_ids.reshape(-1)[pix]
    pix, rows = pix[rows >= 0], rows[rows >= 0]
    rgb, opacity, surface = [], [], []
    for start in range(0, len(pix), 8192):
        sel = pix[start : start + 8192]
        r, a, s = _render_surface(
            params, dev_o[sel], dev_d[sel], lo_j, hi_j,
            cell=cell, near=cfg.near, num=cfg.samples_per_ray,
        )  # fmt: skip
        rgb.append(np.asarray(r))
        opacity.append(np.asarray(a))
        surface.append(np.asarray(s))
    rgb, opacity, surface = (np.concatenate(a) for a in (rgb, opacity, surface))
    inside = np.all((surface >= bounds[0]) & (surface <= bounds[1]), axis=1)
    solid = (opacity > 0.5) & inside
    pix, rows, rgb, surface = pix[solid], rows[solid], rgb[solid], surface[solid]

    # 2. features on the active cells (the trilinear support of the surface points).
    corner_idx, _ = _trilinear_corners(jnp.asarray(surface), lo_j, cell, shape)
    active = np.unique(np.asarray(corner_idx))
    lookup = np.full(int(np.prod(shape)), -1, np.int32)
    lookup[active] = np.arange(len(active), dtype=np.int32)
    feats = jnp.zeros((len(active), pixels.dim))
    ftx = _adam(cfg.feature_learning_rate)
    f_state = ftx.init(feats)
    all_pix = np.flatnonzero(pixels.mask_ids.reshape(-1) >= 0)
    targets = jnp.asarray(pixels.table[pixels.mask_ids.reshape(-1)[all_pix]])
    feat_o, feat_d = dev_o[all_pix], dev_d[all_pix]
    feature_losses = []
    lookup_j = jnp.asarray(lookup)
    for _ in range(cfg.feature_steps if len(active) else 0):
        key, sub = jax.random.split(key)
        feats, f_state, loss = _feature_step(
            feats, f_state, sub, params["density"], lookup_j, feat_o, feat_d, targets, lo_j, hi_j,
            cell=cell, near=cfg.near, num=cfg.samples_per_ray, batch=cfg.rays_per_step,
            top_k=cfg.top_k, tx=ftx,
        )  # fmt: skip
        feature_losses.append(loss)

    point_features = np.concatenate(
        [
            np.asarray(_feature_at(feats, lookup_j, jnp.asarray(chunk), lo_j, cell, shape))
            for chunk in np.array_split(surface, max(1, len(surface) // 8192))
        ]
    ) if len(surface) else np.zeros((0, pixels.dim), np.float32)  # fmt: skip
    has = np.linalg.norm(point_features, axis=1) > 1e-8
    n = int(has.sum())
    lifted = LiftedPoints(
        points=surface[has].astype(np.float32),
        colors=np.clip(np.rint(rgb[has] * 255), 0, 255).astype(np.uint8),
        instance=views.instance.reshape(-1)[pix[has]].astype(np.int32),
        ref_point=np.arange(n, dtype=np.int32),
        ref_row=np.arange(n, dtype=np.int32),
        ref_weight=np.ones(n, np.float32),
        table=point_features[has].astype(np.float32),
    )
    fit = FieldFit(
        lo=lo,
        cell=cell,
        density=np.asarray(params["density"]),
        color=np.asarray(params["color"]),
        color_losses=np.asarray(jnp.stack(color_losses)) if color_losses else np.zeros(0),
        feature_losses=np.asarray(jnp.stack(feature_losses)) if feature_losses else np.zeros(0),
    )
    return lifted, fit
