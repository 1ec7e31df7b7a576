"""Vision Transformer for 2D features: the BLIP-2 EVA ViT-g and CLIP vision towers.

One Flax module reads both HF layouts (`Blip2VisionModel`, a BLIP-2 directory's `vision_model`,
`CLIPVisionModel`, a CLIP directory's `vision_model`); the differences are three switches in the
config (`layout`):

| | blip2 (EVA ViT-g) | clip |
|---|---|---|
| patch conv bias | yes | no |
| q/k/v | one fused `qkv` Dense (bias: q, 0, v) | three Dense with bias |
| LayerNorm before the encoder | no | `pre_layrnorm` |
| LayerNorm on the last hidden state | `post_layernorm` | no (CLIP applies it to the pooled CLS only) |

`apply(pixel_values [B,H,W,3], already normalised with `image_mean`/`image_std`) -> last hidden
state [B,T,C]`, T = 1 + (H/p)(W/p), token 0 is the class token. Images must have the configured
`image_size` (the 2D feature code resizes frames and crops to it).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm3d_jax.model import attention

# OpenAI CLIP normalisation, used by both the BLIP-2 and CLIP image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LAYOUTS = ("blip2", "clip")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    layout: str = "blip2"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"  # "gelu" (exact erf) | "quick_gelu"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_impl: str | None = None  # None / "xla" | "cudnn" (llm3d_jax.model.attention)

    def __post_init__(self):
        attention.check_implementation(self.attention_impl)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def tiny(cls, hidden_size: int = 64) -> ViTConfig:
        """A 2-layer random-init tower for tests and the demo (32x32 images, 16 patches)."""
        return cls(
            layout="blip2",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_layers=2,
            num_heads=4,
            image_size=32,
            patch_size=8,
        )

    @classmethod
    def from_hf(cls, config: dict) -> ViTConfig:
        """From a HF config.json dict: a vision config, or a full BLIP-2 / CLIP config."""
        model_type = config.get("model_type", "")
        if model_type in ("blip-2", "blip_2", "clip"):
            config = {**config.get("vision_config", {}), "model_type": model_type}
        if model_type.startswith("blip"):
            layout, eps, act = "blip2", 1e-6, "gelu"
        elif model_type.startswith("clip"):
            layout, eps, act = "clip", 1e-5, "quick_gelu"
        else:
            raise ValueError(f"not a BLIP-2 or CLIP vision config (model_type={model_type!r})")
        defaults = cls() if layout == "blip2" else _CLIP_DEFAULTS
        return cls(
            layout=layout,
            hidden_size=config.get("hidden_size", defaults.hidden_size),
            intermediate_size=config.get("intermediate_size", defaults.intermediate_size),
            num_layers=config.get("num_hidden_layers", defaults.num_layers),
            num_heads=config.get("num_attention_heads", defaults.num_heads),
            image_size=_square(config.get("image_size", defaults.image_size)),
            patch_size=_square(config.get("patch_size", defaults.patch_size)),
            layer_norm_eps=config.get("layer_norm_eps", eps),
            hidden_act=config.get("hidden_act", act),
        )


# transformers' CLIPVisionConfig defaults (ViT-B/32), for keys a config.json leaves out.
_CLIP_DEFAULTS = ViTConfig(
    layout="clip",
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    image_size=224,
    patch_size=32,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)


def _square(size) -> int:
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"only square images/patches are supported, got {size}")
        return int(size[0])
    return int(size)


def _dense(features: int, names: tuple[str, str], use_bias: bool = True, name=None, dtype=None):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def _layer_norm(config: ViTConfig, name: str):
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.dtype(config.dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: [B,T,C] -> [B,T,C]."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, c = x.shape
        head_dim = c // cfg.num_heads
        if cfg.layout == "blip2":
            qkv = _dense(3 * c, ("embed", "heads"), name="qkv", dtype=dtype)(x)
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            q = _dense(c, ("embed", "heads"), name="query", dtype=dtype)(x)
            k = _dense(c, ("embed", "heads"), name="key", dtype=dtype)(x)
            v = _dense(c, ("embed", "heads"), name="value", dtype=dtype)(x)
        q, k, v = (y.reshape(b, t, cfg.num_heads, head_dim) for y in (q, k, v))  # [B,T,N,hd]
        out = attention.dot_product_attention(
            q, k, v, scale=head_dim**-0.5, implementation=cfg.attention_impl
        ).reshape(b, t, c)
        return _dense(c, ("heads", "embed"), name="out", dtype=dtype)(out)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: [B,T,C] -> [B,T,C]."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = x + Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(x))
        h = _layer_norm(cfg, "norm2")(x)
        h = _dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", dtype=dtype)(h)
        if cfg.hidden_act == "gelu":
            h = jax.nn.gelu(h, approximate=False)
        else:  # quick_gelu, as in OpenAI CLIP
            h = h * jax.nn.sigmoid(1.702 * h)
        h = _dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=dtype)(h)
        return x + h


class ViT(nn.Module):
    """pixel_values [B,H,W,3] (normalised, H = W = image_size) -> last hidden state [B,T,C]."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, h, w, _ = pixel_values.shape
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(f"ViT expects {cfg.image_size}x{cfg.image_size} images, got {h}x{w}")
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=cfg.layout == "blip2",
            dtype=dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embed",
        )(pixel_values.astype(dtype))
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major patches, as torch flatten(2)
        cls_token = self.param(
            "cls_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.hidden_size,),
        )
        pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed")),
            (cfg.num_tokens, cfg.hidden_size),
        )
        cls = jnp.broadcast_to(cls_token.astype(dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + pos_embed.astype(dtype)
        if cfg.layout == "clip":
            x = _layer_norm(cfg, "pre_norm")(x)
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x)
        if cfg.layout == "blip2":
            x = _layer_norm(cfg, "post_norm")(x)
        return x


def init_params(config: ViTConfig, seed: int = 0) -> dict:
    """Random float32 parameters (plain arrays, logical-axis boxes removed)."""
    module = ViT(config)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), dummy)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: ViTConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no allocation): the target of the mapping tables."""
    module = ViT(config)
    dummy = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), dummy)
    return nn.meta.unbox(variables["params"])


def normalize_images(images_uint8, config: ViTConfig):
    """uint8 [...,H,W,3] -> float32 normalised pixel values, as the HF image processors do."""
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    return (x - jnp.asarray(config.image_mean)) / jnp.asarray(config.image_std)


def random_vit(hidden_size: int = 64, seed: int = 0) -> tuple[ViT, dict]:
    """The `random-vit` encoder: `ViTConfig.tiny(hidden_size)` with seeded random weights."""
    config = ViTConfig.tiny(hidden_size)
    return ViT(config), init_params(config, seed)


__all__ = [
    "ViT",
    "ViTConfig",
    "init_params",
    "normalize_images",
    "param_shapes",
    "random_vit",
]
