"""3D-LLM: point features -> 3D position embedding -> Q-Former -> projection -> LLM.

    features [B,N,D] + voxels [B,N,3] --posembed--> [B,N,D] --qformer(point_mask)--> [B,Q,H]
    --proj--> [B,Q,width];  prefix = [queries; embed(prompt_ids)] with mask [ones(Q); prompt_mask]
    -> logits [B,La,V] where logits[:, t] scores answer_ids[:, t]. The LLM is driven through
    one interface, `embed`, `answer_logits`, `prefill_embeds` and `decode_step` (and its config's
    `token_dim` and `forward_flops`), which both families implement (`LLMS`):
    - T5 / FlanT5 (`T5Config`): the prefix is the encoder input; decoder input = answer_ids
      shifted right (start token 0), decoder mask = answer_mask.
    - decoder-only (`DecoderConfig`: OPT, Llama, Qwen2, Mistral): input = [prefix; answer], loss
      on the answer only; the prefix attends causally or, with `prefix_causal=False`,
      bidirectionally.

Parameters: `qformer/...` (with `qformer/query_tokens`), `proj/{kernel,bias}`, `llm/...` (the
LLM, with the location-token rows `llm/loc_embed` and, for an untied head, `llm/loc_head`).
`TRAINABLE` is the default table of what trains (the paper's recipe: Q-Former, queries,
projection, location-token rows; the LLM stays frozen). The released code trains more:
`RELEASE_TRAINABLE` adds the LLM's whole input embedding table and LM head.

Generation (family-agnostic; the cache is a pytree whose every array has the batch on axis 0):
    cache, logits0 = prefill(module, params, features=..., voxels=..., point_mask=...,
                             prompt_ids=..., prompt_mask=..., max_decode_len=L)
    logits, cache = decode_step(module, params, cache, token_ids)      # [B] -> [B,V]
`logits0` scores the first answer token (T5: `prefill` feeds the decoder start token; decoder-only:
the output at the last prefix slot) and the cache has room for the L - 1 answer tokens fed back:
it can produce L answer tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llm3d_jax.model.decoder import Decoder, DecoderConfig
from llm3d_jax.model.location_rows import GRID
from llm3d_jax.model.posembed import MODES, PositionEmbedding3D, output_dim, sincos_table
from llm3d_jax.model.qformer import BertLayer, QFormer, QFormerConfig, bert_dense, bert_layer_norm
from llm3d_jax.model.t5 import T5, T5Config

# Links of `rated_region`, in voxels (about 0.75 m in a 6 m room). With the target points rated
# perfectly, 256 sampled points per room and 400 held-out questions, the region's box reaches
# Acc@0.25 93.0 at 48 voxels, 89.5 at 32, 73.5 at 16 and 93.2 without a limit: sparse points on a
# big object are far apart (python -m tools.oracle_grounding extents). With learned ratings
# (target_threshold -1) a shorter link keeps neighbours out of the box: held-out answers' Acc@0.25
# 43.5 at 32 vs 40.7 at 48 (tools/pretrain_demo's held-out rooms, assets/demo/pretrained_3d);
# make demo's fine-tuned model: 37.9 at 24, 39.4 at 32, 37.8 at 40, 37.3 at 48, 35.5 at 64.
REGION_RADIUS = 32
EXTENT_SLOT_INIT = 0.5  # the slot vectors' scale at init, next to token embeddings of scale ~1

# The LLM module of each config class: both implement the interface in this module's docstring.
LLMS = {T5Config: T5, DecoderConfig: Decoder}

# Regexes (fullmatch over "/"-joined param paths) of what trains by default: the paper's
# "LLM frozen, location-token rows trainable".
TRAINABLE = (
    r"qformer/.*",  # the whole Q-Former, query tokens included
    r"proj/.*",
    r"llm/loc_(?:embed|head)",  # location-token rows; the base vocabulary stays frozen
)
# What the released 3D-LLM trains (the `release` profile): its Blip2T5 sets requires_grad on the
# T5's whole input embedding table and LM head after freezing the T5, so every vocabulary row
# trains (weight decay 0.05 like every matrix), not only the location rows. T5 / FlanT5 only.
RELEASE_TRAINABLE = (*TRAINABLE, r"llm/shared", r"llm/lm_head")

# A directory written by tools/export.py (llm3d_jax.infer.exported) carries this file.
EXPORTED_CONFIG = "llm3d_config.json"

DEFAULT_LOC_BINS = 256


@dataclasses.dataclass(frozen=True)
class LLM3DConfig:
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    llm: T5Config | DecoderConfig = dataclasses.field(
        default_factory=lambda: T5Config.flan_t5_xl(loc_offset=32100, loc_bins=DEFAULT_LOC_BINS)
    )
    feature_dim: int = 1408  # D of the point features
    posembed_mode: str = "add"  # add | concat | none
    posembed_scale: float = 0.01
    # LayerNorm on the point features before the position embedding. Unit-length features of
    # width D have entries ~1/sqrt(D): too small for a from-scratch Q-Former's cross-attention
    # to leave its uniform start (it stays a mean over the scene); off for BLIP-2 weights.
    feature_norm: bool = False
    num_points: int = 5000  # points per scene the data pipeline samples or pads to
    # >0: this many evenly spaced points (`spread_seeds`), each projected to the LLM width, follow
    # the queries in the LLM input, so the LLM can read where things are directly (grounding);
    # 0: the LLM sees the queries only, as the released 3D-LLM.
    point_tokens: int = 0
    # >0: a small transformer (`PointRelevance`, `target_layers` layers) rates every point against
    # the prompt, and the `target_tokens` best-rated points, projected to the LLM width and scaled
    # by their rating, follow the scene tokens: the points of the object the prompt names, so the
    # LLM reads its extent instead of searching the whole scene for it (grounding). The ratings
    # train with the answer loss and, where the data names the objects, a per-point loss
    # (`relevance_loss`). 0: none, as the released 3D-LLM.
    target_tokens: int = 0
    target_layers: int = 2
    # True: `PointRelevance` reads the prompt's words in context (one self-attention layer over
    # them, with their positions) before matching them to the points, so a word can count
    # against a point: in "the chair closest to the red table" the table is not what is named.
    target_context: bool = False
    # The rating logit above which a point counts as the named object's in the box the LLM is
    # shown (`extent_ids`). The per-point loss has few positives per room, so the ratings of an
    # object's own points sit below 0 at its rim and the box at 0 covers a part of it. Measured
    # with the same weights (docs/architecture.md, "Location tokens in the model"): held-out
    # grounding Acc@0.25 28.5 at 0, 34.0 at -0.5, 35.1 at -1, 34.2 at -1.5, 29.8 at -2 (make
    # demo's rooms); 30.1 at 0, 40.7 at -1 (tools/pretrain_demo's held-out rooms, another seed).
    target_threshold: float = -1.0
    # >0 (with target_tokens): the relevance transformer also rates every point as the r-th
    # object the prompt names (r < object_roles; `point_target` == r + 1 is its target), the
    # box of each role's rated region is measured, and `RoleGeometry` turns the boxes into
    # tokens that follow the target tokens: one per role, one per pair of roles, one over all
    # pairs, each an MLP of the boxes' coordinates, sizes and differences (centre offsets,
    # directions, gaps). Relations ("is the X taller than the Y", "standing at the X facing the
    # Y, is the Z on your left") are comparisons of numbers; as location tokens they are not
    # learnt from true boxes, as these they are (docs/architecture.md, "Location tokens in the
    # model").
    object_roles: int = 0

    def __post_init__(self):
        if self.object_roles and not self.target_tokens:
            raise ValueError("object_roles needs target_tokens (the point ratings they extend)")
        if self.object_roles == 1:
            raise ValueError("object_roles: 0, or 2 or more (relations are between objects)")
        if self.posembed_mode not in MODES:
            raise ValueError(f"posembed_mode {self.posembed_mode!r} is not one of {MODES}")
        width = output_dim(self.posembed_mode, self.feature_dim)
        if width != self.qformer.encoder_hidden_size:
            raise ValueError(
                f"Q-Former encoder width {self.qformer.encoder_hidden_size} != {width} "
                f"(features {self.feature_dim}, posembed {self.posembed_mode})"
            )

    @classmethod
    def flan_t5_xl(cls) -> LLM3DConfig:
        """The released 3D-LLM shapes: BLIP-2 Q-Former (768 x 12, 32 queries, 1408-d points),
        FlanT5-XL, 256 location tokens after the 32100 FlanT5 tokens."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> LLM3DConfig:
        """Tests and the CPU demo: 64-d points (the `random-vit` width), 8 queries, tiny FlanT5
        with 512 base tokens and 256 location tokens."""
        base = cls(
            qformer=QFormerConfig.tiny(encoder_hidden_size=64),
            llm=T5Config.tiny(vocab_size=512, loc_offset=512, loc_bins=DEFAULT_LOC_BINS),
            feature_dim=64,
            num_points=256,
        )
        return with_overrides(base, **overrides)

    @classmethod
    def demo(cls, **overrides) -> LLM3DConfig:
        """`make demo`: a small model that trains on a CPU in minutes (128-wide Q-Former and
        FlanT5-shaped LLM, 32 queries as released, 256 points); `make demo` fine-tunes it from
        assets/demo (tools/pretrain_demo.py). Differences from the released shapes, each because
        everything starts from random init: the position embedding is added at scale 1 (not
        0.01: no pretrained feature scale to protect, and grounding needs the positions); the
        features are layer-normed; the Q-Former cross-attends in every layer; and its queries
        are `seeded_queries`, each starting from one of 32 evenly spaced points. From scratch,
        learned query tokens do not learn to tell objects apart (tests/model/test_llm3d.py; at
        init 0.02 their cross-attention stays uniform, at 0.1 they spread but still do not
        separate objects), seeded ones do; at init 0.1 post-LN layers scramble the seeds, so
        the init is BLIP-2's 0.02."""
        base = cls(
            qformer=QFormerConfig.tiny(
                hidden_size=128,
                num_attention_heads=4,
                intermediate_size=256,
                encoder_hidden_size=64,
                num_query_tokens=32,
                cross_attention_frequency=1,
                initializer_range=0.02,
                seeded_queries=True,
            ),
            llm=T5Config.tiny(
                vocab_size=512,
                loc_offset=512,
                loc_bins=DEFAULT_LOC_BINS,
                d_model=128,
                d_kv=32,
                d_ff=256,
                relative_attention_num_buckets=16,
                relative_attention_max_distance=64,
                dropout_rate=0.0,
            ),
            feature_dim=64,
            num_points=256,
            posembed_scale=1.0,
            feature_norm=True,
        )
        return with_overrides(base, **overrides)

    @classmethod
    def tiny_decoder(cls, family: str = "llama", **overrides) -> LLM3DConfig:
        """`tiny` with a decoder-only LLM (llama, qwen2, mistral or opt) instead of T5."""
        llm = DecoderConfig.tiny(family, vocab_size=512, loc_offset=512, loc_bins=DEFAULT_LOC_BINS)
        return with_overrides(dataclasses.replace(cls.tiny(), llm=llm), **overrides)

    @classmethod
    def llama3_3b(cls) -> LLM3DConfig:
        """BLIP-2's Q-Former with Llama-3.2-3B shapes (scanqa_llama.py without weights: what the
        config's train step compiles to), 256 location tokens after its 128256 tokens."""
        llama = DecoderConfig.from_hf(
            dict(
                model_type="llama",
                vocab_size=128256,
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=32.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                ),
                tie_word_embeddings=True,
                bos_token_id=128000,
                eos_token_id=128001,
            ),
            loc_bins=DEFAULT_LOC_BINS,
        )
        return cls(llm=llama)

    @property
    def llm_width(self) -> int:
        """Width of the LLM's token embeddings: what `proj` maps the queries to."""
        return self.llm.token_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LLM3DConfig:
        d = dict(d)
        llm = d.pop("llm")
        llm = DecoderConfig(**llm) if "family" in llm else T5Config(**llm)
        return cls(qformer=QFormerConfig(**d.pop("qformer")), llm=llm, **d)


def grounding_settings(config: LLM3DConfig) -> tuple[int, int, int, int, bool, int]:
    """What a model grows for grounding: (point_tokens, loc_table_dim, target_tokens,
    target_layers, target_context, object_roles); a loaded model whose settings differ is
    grown (`grow_params`)."""
    layers = config.target_layers if config.target_tokens else 0
    context = config.target_context if config.target_tokens else False
    return (
        config.point_tokens,
        config.llm.loc_table_dim,
        config.target_tokens,
        layers,
        context,
        config.object_roles,
    )


def with_overrides(
    config: LLM3DConfig,
    *,
    dtype: str | None = None,
    remat: bool | None = None,
    feature_dim: int | None = None,
    vocab_size: int | None = None,
    loc_offset: int | None = None,
    loc_bins: int | None = None,
    loc_table_dim: int | None = None,
    prefix_causal: bool | None = None,
    scan_layers: bool | None = None,
    attention_impl: str | None = None,
    dropout: float | None = None,
    t5_activation: str | None = None,
    **fields,
) -> LLM3DConfig:
    """A copy with common knobs changed in every sub-config they touch.

    dtype: compute dtype of the Q-Former and the LLM; remat: per LLM block; feature_dim: also
    the Q-Former's encoder width; vocab_size: base vocabulary (loc_offset follows unless given);
    scan_layers: LLM blocks stacked and run with nn.scan (params of the other layout convert with
    `llm3d_jax.loading.relayout_llm_layers`); prefix_causal: decoder-only LLMs only;
    attention_impl: the Q-Former's and the LLM's ("xla" or "cudnn"; None keeps them); dropout:
    every dropout rate of the Q-Former and the LLM (0.0: none, as in a reference forward; None
    keeps the checkpoint's); t5_activation: a T5 LLM's FFN activation (`t5.ACTIVATIONS`: "gelu"
    is exact GELU, what the released 3D-LLM sets; "gelu_new" FlanT5's tanh approximation); other
    keywords are top-level fields (posembed_mode, posembed_scale, num_points).
    """
    qformer, llm = config.qformer, config.llm
    if t5_activation is not None:
        if not isinstance(llm, T5Config):
            raise ValueError(f"t5_activation applies to T5 LLMs, not {type(llm).__name__}")
        llm = dataclasses.replace(llm, activation=t5_activation)
    if prefix_causal is not None:
        if not isinstance(llm, DecoderConfig):
            raise ValueError(
                f"prefix_causal applies to decoder-only LLMs, not {type(llm).__name__}"
            )
        llm = dataclasses.replace(llm, prefix_causal=prefix_causal)
    if scan_layers is not None:
        llm = dataclasses.replace(llm, scan_layers=scan_layers)
    if dtype is not None:
        qformer = dataclasses.replace(qformer, dtype=dtype)
        llm = dataclasses.replace(llm, dtype=dtype)
    if remat is not None:
        llm = dataclasses.replace(llm, remat=remat)
    if attention_impl is not None:
        qformer = dataclasses.replace(qformer, attention_impl=attention_impl)
        llm = dataclasses.replace(llm, attention_impl=attention_impl)
    if dropout is not None:
        qformer = dataclasses.replace(
            qformer, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
        )
        rates = {"dropout_rate": dropout}
        if hasattr(llm, "attention_dropout"):
            rates["attention_dropout"] = dropout
        llm = dataclasses.replace(llm, **rates)
    if vocab_size is not None:
        llm = dataclasses.replace(
            llm, vocab_size=vocab_size, loc_offset=vocab_size if loc_offset is None else loc_offset
        )
    elif loc_offset is not None:
        llm = dataclasses.replace(llm, loc_offset=loc_offset)
    if loc_bins is not None:
        llm = dataclasses.replace(llm, loc_bins=loc_bins)
    if loc_table_dim is not None:
        llm = dataclasses.replace(llm, loc_table_dim=loc_table_dim)
    feature_dim = config.feature_dim if feature_dim is None else feature_dim
    mode = fields.get("posembed_mode", config.posembed_mode)
    qformer = dataclasses.replace(qformer, encoder_hidden_size=output_dim(mode, feature_dim))
    return dataclasses.replace(config, qformer=qformer, llm=llm, feature_dim=feature_dim, **fields)


class LLM3D(nn.Module):
    """features [B,N,D] float, voxels [B,N,3] int, point_mask [B,N], prompt_ids / prompt_mask
    [B,Lp], answer_ids / answer_mask [B,La] -> logits float32 [B,La,V] (teacher forcing)."""

    config: LLM3DConfig

    def setup(self):
        c = self.config
        if c.feature_norm:
            self.feature_norm = nn.LayerNorm(epsilon=1e-6, param_dtype=jnp.float32)
        self.posembed = PositionEmbedding3D(c.posembed_mode, c.posembed_scale)
        self.qformer = QFormer(c.qformer)
        # into the LLM's token width: the queries, and the point tokens when there are any
        to_llm = functools.partial(
            nn.Dense,
            c.llm_width,
            dtype=c.llm.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.qformer.initializer_range), (None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        )
        self.proj = to_llm()
        if c.point_tokens:
            self.point_proj = to_llm()
        if c.target_tokens:
            self.relevance = PointRelevance(
                relevance_config(c), context=c.target_context, roles=c.object_roles
            )
            self.target_proj = to_llm()
            if c.object_roles:
                self.role_geometry = RoleGeometry(c.llm_width, c.llm.compute_dtype)
            # One learned vector per extent slot (x, y, z minima, then maxima), added to the six
            # location tokens: the answer's t-th location token then finds "slot t" by content.
            # Without them the slots differ only by their bins and their place in the prefix.
            self.extent_slots = self.param(
                "extent_slots",
                nn.with_logical_partitioning(
                    nn.initializers.normal(EXTENT_SLOT_INIT), (None, "embed")
                ),
                (6, c.llm_width),
                jnp.float32,
            )
        self.llm = LLMS[type(c.llm)](c.llm)

    def scene_tokens(
        self,
        features,
        voxels,
        point_mask,
        prompt_embeds=None,
        prompt_mask=None,
        deterministic=True,
        role_target=None,
    ):
        """-> (the 3D scene as the LLM sees it [B,S,width], its mask bool [B,S]): the projected
        queries [B,Q,width], then with `point_tokens` P projected points [B,P,width], then with
        `target_tokens` T projected best-rated points [B,T,width] and the six location tokens
        of their region's box (these need the embedded prompt [B,Lp,width] and its mask), then
        with `object_roles` R the `RoleGeometry` tokens [B,G,width] of the R roles' boxes."""
        c = self.config
        if c.feature_norm:
            features = self.feature_norm(features.astype(jnp.float32))
        points = self.posembed(features, voxels)  # [B,N,D']
        point_mask = jnp.asarray(point_mask, bool)
        seeds = None
        if c.qformer.seeded_queries:
            index = spread_seeds(point_mask, c.qformer.num_query_tokens)
            seeds = jnp.take_along_axis(points, index[..., None], axis=1)  # [B,Q,D']
        tokens = self.proj(self.qformer(points, point_mask, deterministic, query_seeds=seeds))
        mask = jnp.ones(tokens.shape[:2], bool)
        if c.point_tokens:
            index = spread_seeds(point_mask, c.point_tokens)  # [B,P]
            picked = jnp.take_along_axis(points, index[..., None], axis=1)  # [B,P,D']
            tokens = jnp.concatenate([tokens, self.point_proj(picked).astype(tokens.dtype)], 1)
            mask = jnp.concatenate([mask, jnp.take_along_axis(point_mask, index, axis=1)], 1)
        if c.target_tokens:
            rating = self.relevance(points, point_mask, prompt_embeds, prompt_mask, deterministic)
            if c.object_roles:
                rating, roles = rating  # [B,N], [B,N,R]
            rating = jnp.where(point_mask, rating, -1e9)  # [B,N] float32
            self.sow("intermediates", "point_ratings", rating)
            _, index = jax.lax.top_k(rating, min(c.target_tokens, rating.shape[1]))
            index = jnp.sort(index, axis=1)  # [B,T], in stored (raster) order
            picked = jnp.take_along_axis(points, index[..., None], axis=1)  # [B,T,D']
            gate = jax.nn.sigmoid(jnp.take_along_axis(rating, index, axis=1))[..., None]
            picked = (self.target_proj(picked) * gate.astype(tokens.dtype)).astype(tokens.dtype)
            # the box of the best-rated point's region: a stray point rated positive across the
            # room would stretch the plain box of every positive point (tools/oracle_grounding.py
            # measures both)
            ids = extent_ids(  # [B,6]
                rating, voxels, point_mask, c.llm, region=True, threshold=c.target_threshold
            )
            extent = self.llm.embed(ids)  # [B,6,width]
            extent = extent + self.extent_slots.astype(extent.dtype)
            tokens = jnp.concatenate([tokens, picked, extent.astype(tokens.dtype)], 1)
            mask = jnp.concatenate(
                [
                    mask,
                    jnp.take_along_axis(point_mask, index, axis=1),
                    jnp.ones(extent.shape[:2], bool),
                ],
                1,
            )
            if c.object_roles:
                roles = jnp.where(point_mask[..., None], roles, -1e9)
                self.sow("intermediates", "role_ratings", roles)
                boxes = role_boxes(roles, voxels, point_mask, c.target_threshold)  # [B,R,6]
                presence = jax.nn.sigmoid(jnp.max(roles, axis=1))  # [B,R]
                if role_target is not None:
                    boxes, presence = taught_roles(role_target, voxels, point_mask, boxes, presence)
                geometry = self.role_geometry(boxes, presence)  # [B,G,width]
                tokens = jnp.concatenate([tokens, geometry.astype(tokens.dtype)], 1)
                mask = jnp.concatenate([mask, jnp.ones(geometry.shape[:2], bool)], 1)
        return tokens, mask

    def query_embeds(self, features, voxels, point_mask, deterministic=True):
        """-> projected queries [B,Q,width] (the scene tokens without point or target tokens)."""
        c = self.config
        if c.target_tokens:
            raise ValueError("query_embeds: a model with target_tokens needs the prompt (prefix)")
        tokens, _ = self.scene_tokens(features, voxels, point_mask, deterministic=deterministic)
        return tokens[:, : c.qformer.num_query_tokens]

    def prefix(
        self,
        features,
        voxels,
        point_mask,
        prompt_ids,
        prompt_mask,
        deterministic=True,
        role_target=None,
    ):
        """-> ([scene tokens; embedded prompt] [B,S+Lp,width], its mask bool [B,S+Lp])."""
        prompt = self.llm.embed(prompt_ids)
        prompt_mask = prompt_mask.astype(bool)
        scene, scene_mask = self.scene_tokens(
            features, voxels, point_mask, prompt, prompt_mask, deterministic, role_target
        )
        embeds = jnp.concatenate([scene.astype(prompt.dtype), prompt], axis=1)
        mask = jnp.concatenate([scene_mask, prompt_mask], axis=1)
        return embeds, mask

    def encode(self, features, voxels, point_mask, prompt_ids, prompt_mask, deterministic=True):
        """T5 only -> (encoder output [B,Q+Lp,d_model], its mask bool [B,Q+Lp])."""
        embeds, mask = self.prefix(
            features, voxels, point_mask, prompt_ids, prompt_mask, deterministic
        )
        encoded = self.llm.encode(
            inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic
        )
        return encoded, mask

    def __call__(
        self,
        features,
        voxels,
        point_mask,
        prompt_ids,
        prompt_mask,
        answer_ids,
        answer_mask,
        deterministic: bool = True,
        role_target=None,
    ):
        """role_target int [B,N] (training, `object_roles`): a row >= 0 shows the LLM the true
        boxes of its roles (points == r + 1) instead of the rated ones; a row of -1 the rated."""
        embeds, mask = self.prefix(
            features, voxels, point_mask, prompt_ids, prompt_mask, deterministic, role_target
        )
        return self.llm.answer_logits(embeds, mask, answer_ids, answer_mask, deterministic)

    def prefill(self, features, voxels, point_mask, prompt_ids, prompt_mask, max_decode_len: int):
        embeds, mask = self.prefix(features, voxels, point_mask, prompt_ids, prompt_mask)
        return self.llm.prefill_embeds(embeds, mask, max_decode_len)

    def decode_step(self, cache, token_ids):
        return self.llm.decode_step(cache, token_ids)


def relevance_config(config: LLM3DConfig) -> QFormerConfig:
    """The shapes of `PointRelevance`: the Q-Former's width, heads and feed-forward, reading
    the position-embedded points and cross-attending to the LLM's prompt embeddings."""
    return dataclasses.replace(
        config.qformer,
        num_hidden_layers=config.target_layers,
        encoder_hidden_size=config.llm_width,
        seeded_queries=False,
    )


def _unit_dense(
    features: int, config: QFormerConfig, name: str, in_axis: str | None = "enc_embed"
) -> nn.Dense:
    """A Dense from a width (logical axis `in_axis`) to `features` with LeCun-normal init
    (variance 1 / fan-in)."""
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (in_axis, "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class PointRelevance(nn.Module):
    """points [B,N,D'] (position-embedded features), point_mask bool [B,N], prompt [B,Lp,width]
    (the LLM's prompt embeddings), prompt_mask bool [B,Lp] -> ratings float32 [B,N]: a logit of
    each point belonging to what the prompt names. Each layer: self-attention over the points
    (relations between objects), cross-attention to the prompt, feed-forward. With `context`,
    the words of the direct match are read in context first. With `roles` R, also role ratings
    float32 [B,N,R] (returned after the ratings): each point against the r-th object the prompt
    names, R learned queries picking their words from the prompt read in context."""

    config: QFormerConfig
    context: bool = False
    roles: int = 0

    @nn.compact
    def __call__(self, points, point_mask, prompt, prompt_mask, deterministic=True):
        cfg = self.config
        x = bert_dense(cfg.hidden_size, ("enc_embed", "embed"), cfg, "points_in")(points)  # [B,N,H]
        x = bert_layer_norm(cfg, "norm_in")(x)
        prompt = prompt.astype(x.dtype)
        # A direct match of each point with the prompt's words, summed over the words, so a point
        # matching two of them ("red" and "chair") outscores one that matches one.
        # Both factors start at unit scale (LeCun init, not the layers' 0.02): a product of two
        # 0.02-scaled projections starts near zero with near-zero gradients and barely moves.
        if self.context:
            # which word names the object and which only relates it to another
            p = self.read_in_context(prompt, prompt_mask, deterministic)
            words = _unit_dense(cfg.hidden_size, cfg, "words", None)(p)  # [B,Lp,H]
        else:
            words = _unit_dense(cfg.hidden_size, cfg, "words")(prompt)  # [B,Lp,H]
        words = jnp.sum(words * prompt_mask[..., None].astype(words.dtype), axis=1)  # [B,H]
        keys = _unit_dense(cfg.hidden_size, cfg, "match")(points)  # [B,N,H]
        match = jnp.einsum("bnh,bh->bn", keys, words).astype(jnp.float32) / np.sqrt(keys.shape[-1])
        for i in range(cfg.num_hidden_layers):
            layer = BertLayer(cfg, has_cross_attention=True, name=f"layer_{i}")
            x = layer(x, point_mask, prompt, prompt_mask, deterministic)
        rating = bert_dense(1, ("embed", None), cfg, "rating")(x)[..., 0].astype(jnp.float32)
        if not self.roles:
            return rating + match
        return rating + match, self.role_ratings(points, prompt, prompt_mask, deterministic)

    def read_in_context(self, prompt, prompt_mask, deterministic, prefix: str = ""):
        """prompt [B,Lp,width] -> [B,Lp,H]: the words with their sin/cos positions through one
        self-attention layer (params `{prefix}prompt_in`, `_norm`, `_layer`)."""
        cfg = self.config
        p = bert_dense(cfg.hidden_size, ("enc_embed", "embed"), cfg, f"{prefix}prompt_in")(prompt)
        p = p + jnp.asarray(sincos_table(p.shape[1], p.shape[2]), p.dtype)
        p = bert_layer_norm(cfg, f"{prefix}prompt_norm")(p)
        return BertLayer(cfg, name=f"{prefix}prompt_layer")(
            p, prompt_mask, deterministic=deterministic
        )

    def role_ratings(self, points, prompt, prompt_mask, deterministic):
        """-> [B,N,R]: the direct match of each point with the words of each role. The words
        are read in context (where a noun sits: "standing at the X facing the Y" names X
        first), and role r's learned query picks its words by attention."""
        cfg = self.config
        h = cfg.hidden_size
        p = self.read_in_context(prompt, prompt_mask, deterministic, "role_")
        queries = self.param(
            "role_queries",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
            (self.roles, h),
            jnp.float32,
        )
        keys = _unit_dense(h, cfg, "role_word_keys", None)(p)  # [B,Lp,H]
        attend = jnp.einsum("rh,blh->brl", queries.astype(keys.dtype), keys) / np.sqrt(h)
        attend = jnp.where(prompt_mask[:, None, :], attend.astype(jnp.float32), -1e9)
        words = _unit_dense(h, cfg, "role_words", None)(p)  # [B,Lp,H]
        words = jnp.einsum("brl,blh->brh", jax.nn.softmax(attend, -1).astype(words.dtype), words)
        match = _unit_dense(h, cfg, "role_match")(points)  # [B,N,H]
        return jnp.einsum("bnh,brh->bnr", match, words).astype(jnp.float32) / np.sqrt(h)


def _best_point(rating, point_mask):
    """ratings [..., N] -> bool [..., N], True at each row's best-rated real point."""
    best = jnp.argmax(jnp.where(point_mask, rating, -jnp.inf), axis=-1)  # [...]
    return jnp.arange(rating.shape[-1]) == best[..., None]


def extent_ids(rating, voxels, point_mask, llm, region: bool = False, threshold: float = 0.0):
    """ratings [B,N], voxels int [B,N,3] -> location token ids int32 [B,6] of the LLM config
    `llm`: the box (x, y, z minima, then maxima) of the points rated as the named object's
    (rating > threshold; the best-rated point when none is; with `region`, only those `rated_region`
    links to the best-rated one), as the answer would spell it. They follow the target tokens,
    so answering "where" is copying six tokens the LLM already reads; the box is discrete (no
    gradient): the ratings learn from their own per-point loss."""
    if region:
        inside = rated_region(rating, voxels, point_mask, threshold=threshold)
    else:
        point_mask = jnp.asarray(point_mask, bool)
        inside = ((rating > threshold) & point_mask) | _best_point(rating, point_mask)
    bins = points_box(inside, voxels) * llm.loc_bins // GRID
    return (llm.loc_offset + bins).astype(jnp.int32)


def _per_row(x, inside):
    """A per-point array [B,N,...] of the scene, with a size-1 axis after B for each axis
    `inside` ([B,N] or [B,R,N]) has between its batch and its points."""
    return jnp.expand_dims(x, tuple(range(1, inside.ndim - 1)))


def points_box(inside, voxels):
    """inside bool [B,N] (or [B,R,N]), voxels int [B,N,3] -> int32 [B,6] (or [B,R,6]): the voxel
    box (x, y, z minima, then maxima) of the points inside."""
    v = _per_row(jnp.asarray(voxels, jnp.int32), inside)
    lo = jnp.min(jnp.where(inside[..., None], v, GRID - 1), axis=-2)  # [...,3]
    hi = jnp.max(jnp.where(inside[..., None], v, 0), axis=-2)
    return jnp.concatenate([lo, hi], axis=-1)


def role_boxes(roles, voxels, point_mask, threshold: float):
    """role ratings [B,N,R], voxels int [B,N,3] -> int32 [B,R,6]: the voxel box of each role's
    `rated_region` (no gradient, as `extent_ids`)."""
    inside = rated_region(jnp.moveaxis(roles, 2, 1), voxels, point_mask, threshold=threshold)
    return points_box(inside, voxels)


def taught_roles(role_target, voxels, point_mask, boxes, presence):
    """role_target int [B,N] (0: no role, r + 1: role r; a row of -1: not taught) -> (boxes
    [B,R,6], presence [B,R]): in taught rows, each role's true box, and presence 1 where the
    role has points, else 0 (its box stays the rated one: an empty box has no size); in the
    others the rated `boxes` and `presence` as given."""
    target = jnp.asarray(role_target, jnp.int32)
    roles = jnp.arange(1, boxes.shape[1] + 1)
    inside = (target[:, None, :] == roles[None, :, None]) & point_mask[:, None, :]  # [B,R,N]
    has = jnp.any(inside, axis=-1)  # [B,R]
    taught = jnp.all(target >= 0, axis=1)  # [B]
    true_boxes = points_box(inside, voxels)
    boxes = jnp.where((taught[:, None] & has)[..., None], true_boxes, boxes)
    presence = jnp.where(taught[:, None], has.astype(presence.dtype), presence)
    return boxes, presence


GEOMETRY_HIDDEN = 256


class RoleGeometry(nn.Module):
    """boxes int [B,R,6] (voxels: x, y, z minima, then maxima), presence [B,R] in [0, 1] ->
    tokens [B, R + R(R-1)/2 + 1 (+ R), width]: one per role (its box: corners, centre, size, log
    volume), one per pair i < j (both roles', the centre offset, its horizontal length and
    direction, the size difference and the two gaps between the boxes along each axis) and
    one over all pairs (with, seen from each role, the cross and dot product of the directions
    to two others: left or right, between or not), and with R >= 3 one per role of those
    products alone, each a 3-layer MLP, scaled by the roles' presence (a role the prompt does
    not fill rates no point high)."""

    width: int
    dtype: object = jnp.float32

    def mlp(self, x, name: str):
        for i, features in enumerate((GEOMETRY_HIDDEN, GEOMETRY_HIDDEN)):
            x = nn.gelu(self._dense(features, f"{name}_{i}")(x))
        return self._dense(self.width, f"{name}_out", (None, "embed"))(x)

    def _dense(self, features, name, axes=(None, None)):
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
            name=name,
        )

    @nn.compact
    def __call__(self, boxes, presence):
        b = jnp.asarray(boxes, jnp.float32) / (GRID / 2) - 1.0  # [B,R,6] in [-1, 1]
        lo, hi = b[..., :3], b[..., 3:]
        centre, size = (lo + hi) / 2, hi - lo
        volume = jnp.log(jnp.prod(size + 1e-2, axis=-1, keepdims=True))
        role = jnp.concatenate([lo, hi, centre, size, volume], -1)  # [B,R,13]
        count = boxes.shape[1]
        pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
        pair_features, pair_presence = [], []
        for i, j in pairs:
            offset = centre[:, j] - centre[:, i]  # [B,3]
            length = jnp.sqrt(jnp.sum(offset[:, :2] ** 2, -1, keepdims=True) + 1e-6)
            pair_features.append(
                jnp.concatenate(
                    [
                        role[:, i],
                        role[:, j],
                        offset,
                        length,
                        _horizontal_direction(centre[:, i], centre[:, j]),
                        size[:, j] - size[:, i],
                        lo[:, j] - hi[:, i],  # gaps: > 0 where j lies beyond i along an axis
                        lo[:, i] - hi[:, j],
                    ],
                    -1,
                )
            )
            pair_presence.append(presence[:, i] * presence[:, j])
        pair_features = jnp.stack(pair_features, 1)  # [B,R(R-1)/2,41]
        pair_presence = jnp.stack(pair_presence, 1)
        # Seen from each role i, the other two j < k: the cross and dot product of the unit
        # horizontal directions i -> j and i -> k (k on the left of i facing j; i between j
        # and k): a product the MLPs would otherwise have to learn from few examples.
        turns = []  # per role [B, (R-1)(R-2)]
        for i in range(count):
            others = [j for j in range(count) if j != i]
            seen = []
            for j, k in [(j, k) for j in others for k in others if j < k]:
                u, v = (_horizontal_direction(centre[:, i], centre[:, t]) for t in (j, k))
                seen += [u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0], jnp.sum(u * v, -1)]
            turns.append(jnp.stack(seen, -1) if seen else jnp.zeros((b.shape[0], 0)))
        turns = jnp.stack(turns, 1)  # [B,R,(R-1)(R-2)]
        all_pairs = pair_features.reshape(b.shape[0], -1)
        all_pairs = jnp.concatenate([all_pairs, turns.reshape(b.shape[0], -1)], -1)
        role_embed = self.param(
            "role_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (count, self.width),
            jnp.float32,
        )
        everyone = jnp.prod(presence, axis=1)[:, None, None]  # [B,1,1]
        tokens = [
            (self.mlp(role, "role") + role_embed) * presence[..., None],
            self.mlp(pair_features, "pair") * pair_presence[..., None],
            self.mlp(all_pairs, "pairs")[:, None] * everyone,
        ]
        if turns.shape[-1]:  # three roles or more: one token per role of what it sees
            tokens.append((self.mlp(turns, "turn") + role_embed) * everyone)
        return jnp.concatenate([t.astype(self.dtype) for t in tokens], 1)


def _horizontal_direction(a, b):
    """centres [B,3] -> the unit vector [B,2] from a to b in the horizontal plane."""
    offset = b[:, :2] - a[:, :2]
    return offset / jnp.sqrt(jnp.sum(offset**2, -1, keepdims=True) + 1e-6)


def rated_region(
    rating,
    voxels,
    point_mask,
    radius: int = REGION_RADIUS,
    steps: int = 8,
    threshold: float = 0.0,
):
    """ratings [B,N], voxels int [B,N,3] -> bool [B,N]: the best-rated point and the points
    rated > threshold that a chain of such points, each within `radius` voxels of the next,
    links to it (`steps` links at most). One stray point rated high across the room then does
    not stretch the box to it. Ratings [B,R,N] (several per point, e.g. object roles) give
    [B,R,N], from one distance matrix per scene."""
    point_mask = _per_row(jnp.asarray(point_mask, bool), rating)
    region = _best_point(rating, point_mask)  # [...,N]
    rated = ((rating > threshold) & point_mask) | region
    # squared distances as |a|^2 + |b|^2 - 2 a.b: one [B,N,N] array, not an [B,N,N,3] one;
    # voxel coordinates <= 255 keep every term exact in float32 (HIGHEST: no bf16/TF32 matmul)
    v = jnp.asarray(voxels, jnp.float32)
    sq = jnp.sum(v * v, axis=-1)  # [B,N]
    dots = jnp.einsum("bnc,bmc->bnm", v, v, precision=jax.lax.Precision.HIGHEST)
    d2 = sq[:, :, None] + sq[:, None, :] - 2 * dots
    near = _per_row(d2 <= radius**2, rating)  # [B,N,N] (or [B,1,N,N])
    linked = near & rated[..., :, None] & rated[..., None, :]
    for _ in range(steps):
        region = region | jnp.any(linked & region[..., None, :], axis=-1)
    return region


def spread_seeds(point_mask, count: int):
    """point_mask [B,N] -> int32 [B,count]: `count` real points evenly spaced in stored order.
    The pipeline stores points in voxel (raster) order and samples them uniformly or per
    instance, so evenly spaced picks spread over the scene and hit each object about in
    proportion to its points. (Farthest-point sampling was tried first: it puts most seeds on
    the walls and floor, the scene's extremes, and leaves objects unseeded.) A scene with fewer
    than `count` real points repeats some."""
    real = jnp.asarray(point_mask, bool)
    cumulative = jnp.cumsum(real, axis=1)  # [B,N]
    total = cumulative[:, -1:]  # [B,1]
    ranks = jnp.floor((jnp.arange(count) + 0.5) * total / count).astype(cumulative.dtype)
    # index of the (rank+1)-th real point: the first position whose cumulative count exceeds rank
    index = jax.vmap(lambda c, r: jnp.searchsorted(c, r, side="right"))(cumulative, ranks)
    return jnp.minimum(index, real.shape[1] - 1).astype(jnp.int32)


def prefill(
    module: LLM3D,
    params,
    *,
    features,
    voxels,
    point_mask,
    prompt_ids,
    prompt_mask,
    max_decode_len: int,
):
    """-> (cache, logits0 [B,V]): logits0 scores the first answer token."""
    return module.apply(
        {"params": params},
        features,
        voxels,
        point_mask,
        prompt_ids,
        prompt_mask,
        max_decode_len,
        method=LLM3D.prefill,
    )


def decode_step(module: LLM3D, params, cache, token_ids):
    """token_ids int32 [B] (the previous answer token) -> (logits [B,V], cache)."""
    return module.apply({"params": params}, cache, token_ids, method=LLM3D.decode_step)


def trainable_mask(params, patterns: Sequence[str] = TRAINABLE):
    """Tree of bools like `params`: True where the "/"-joined path fullmatches a pattern."""
    regexes = [re.compile(p) for p in patterns]
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: any(r.fullmatch("/".join(k)) for r in regexes) for k in flat}
    )


def init_params(module: LLM3D, seed: int = 0, batch: int = 1, points: int = 4) -> dict:
    """Random float32 params (unboxed), initialised inside `jax.jit`."""
    inputs = example_inputs(module.config, batch=batch, points=points)
    init = jax.jit(lambda rng: nn.unbox(module.init(rng, **inputs))["params"])
    return init(jax.random.key(seed))


def grow_params(module: LLM3D, params: dict, seed: int = 0) -> tuple[dict, list[str]]:
    """Params of another config of the same model (e.g. loaded before `point_tokens` or
    `loc_table_dim` were set) -> (params for `module`, the "/"-joined paths initialised afresh):
    every param `module` has keeps its loaded value when the shapes agree; the others are new
    (a random init), and loaded params `module` does not have are dropped."""
    fresh = traverse_util.flatten_dict(init_params(module, seed=seed))
    loaded = traverse_util.flatten_dict(params)
    out, new = {}, []
    for path, value in fresh.items():
        old = loaded.get(path)
        if old is not None and tuple(old.shape) == tuple(value.shape):
            out[path] = old
        else:
            out[path] = value
            new.append("/".join(path))
    return traverse_util.unflatten_dict(out), new


def abstract_params(module: LLM3D) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s (unboxed), nothing allocated."""
    inputs = example_inputs(module.config, points=4)
    return jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), **inputs))["params"])


def example_inputs(
    config: LLM3DConfig,
    batch: int = 1,
    points: int | None = None,
    prompt_len: int = 4,
    answer_len: int = 4,
) -> dict:
    """Zeros with the model's input shapes (what `init` and `jax.eval_shape` trace)."""
    n = config.num_points if points is None else points
    return dict(
        features=jnp.zeros((batch, n, config.feature_dim), jnp.float32),
        voxels=jnp.zeros((batch, n, 3), jnp.int32),
        point_mask=jnp.ones((batch, n), bool),
        prompt_ids=jnp.zeros((batch, prompt_len), jnp.int32),
        prompt_mask=jnp.ones((batch, prompt_len), bool),
        answer_ids=jnp.zeros((batch, answer_len), jnp.int32),
        answer_mask=jnp.ones((batch, answer_len), bool),
    )
