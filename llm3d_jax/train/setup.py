"""A run config -> the model, its data and the compiled train step: the set-up that
experiments/train.py, experiments/eval.py (through `llm3d_jax.infer.restore.load_run`),
tools/export.py and the train-step benchmark (tools/bench/train_step.py) share, so they all
build exactly the model and step a run trains.

The config is the ml_collections dict of experiments/configs/*.py. Its `profile` (optional key,
default "ours") switches everything that differs in the released 3D-LLM at once: "release" feeds
the data the release's way (`llm3d_jax.data.preprocess`), runs the T5 with exact GELU, trains
`llm3d.RELEASE_TRAINABLE` and steps the lr per epoch (`optimizer.make_release_schedule`).
"""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llm3d_jax import loading, tokens
from llm3d_jax.fileio import InputError
from llm3d_jax.model import llm3d
from llm3d_jax.model.t5 import T5Config
from llm3d_jax.train import optimizer, sharding
from llm3d_jax.train import state as state_lib
from llm3d_jax.train import step as step_lib


def is_lavis_checkpoint(path: str) -> bool:
    """A released LAVIS checkpoint (a `.pth` file) rather than a model directory."""
    return bool(path) and path.endswith(".pth") and not os.path.isdir(path)


def tokenizer_dir(config) -> str:
    """The tokenizer directory of a run config ("" when it names none): the LLM's directory,
    else the pretrained directory (a LAVIS .pth's: its BLIP-2 base), else `config.tokenizer`."""
    m = config.model
    pretrained = m.pretrained
    if is_lavis_checkpoint(pretrained):
        pretrained = m.get("base") or ""
    return m.get("llm_pretrained") or pretrained or config.get("tokenizer", "")


def build_model(config, with_optimizer: bool = False):
    """-> (module, host params or None for a random init); with `with_optimizer`, a third item:
    None, or (mu, nu, count) of the optimizer state the pretrained checkpoint carries.

    Pretrained: a BLIP-2 / exported directory (`llm3d_jax.loading.load_llm3d`), or a released
    LAVIS `.pth` over the BLIP-2 directory `model.base` (`loading.load_lavis`; its AdamW moments
    in the params' layout, zeros where it has none). Random init: the `model.preset` shapes (an
    LLM3DConfig constructor; `tiny_decoder:FAMILY` picks the decoder family: llama, qwen2,
    mistral or opt), with the vocabulary sized to `config.tokenizer` when training on tokenised
    (tfds) data.
    """
    m = config.model
    overrides = dict(dtype=m.dtype, remat=m.remat, num_points=config.data.num_points)
    if profile(config) == "release":
        # LAVIS's Blip2T5 sets the T5's dense_act_fn to "gelu" (exact), whatever the weights.
        overrides["t5_activation"] = "gelu"
    # Optional knobs: scan_layers (any LLM), prefix_causal (decoder-only: scanqa_llama.py),
    # attention_impl ("cudnn": cuDNN's fused attention on a GPU), dropout (every dropout rate).
    # Grounding knobs (demo.py): a pretrained model without them grows them; unset (None): as
    # the pretrained model or the preset has them.
    grounding = (
        "point_tokens",
        "loc_table_dim",
        "target_tokens",
        "target_layers",
        "target_context",
        "target_threshold",
        "object_roles",
    )
    for key in ("prefix_causal", "scan_layers", "attention_impl", "dropout", *grounding):
        if m.get(key) is not None:
            overrides[key] = m[key]
    llm_path = m.get("llm_pretrained") or None
    reinit = tuple(m.get("reinit", ()))
    if reinit and (not m.pretrained or is_lavis_checkpoint(m.pretrained)):
        raise InputError(None, "config.model.reinit: only with an exported model as pretrained")
    if m.pretrained:
        moments = None
        if is_lavis_checkpoint(m.pretrained):
            base = m.get("base") or ""
            if not base:
                raise InputError(
                    m.pretrained,
                    "a LAVIS checkpoint needs config.model.base, its HF BLIP-2 FlanT5 directory",
                )
            if not os.path.isdir(base):
                raise InputError(base, "BLIP-2 base directory (config.model.base) not found")
            if llm_path:
                raise InputError(None, "config.model.llm_pretrained: not with a LAVIS .pth")
            module, params, *saved = loading.load_lavis(
                m.pretrained, base, with_optimizer=with_optimizer
            )
            if saved and saved[0] is not None:
                moments = (saved[0].mu, saved[0].nu, saved[0].count)
        else:
            for path in (m.pretrained, llm_path):
                if path and not os.path.isdir(path):
                    raise InputError(path, "pretrained model directory not found")
            module, params = loading.load_llm3d(m.pretrained, llm_path=llm_path, reinit=reinit)
        model_config = _with_overrides(config, module.config, overrides)
        # HF / BLIP-2 loads give one subtree per block; nn.scan wants them stacked (and an
        # exported scanned model may be trained unscanned). Moments follow their params.
        relayout = lambda tree: loading.relayout_llm_layers(
            tree, module.config, model_config.llm.scan_layers
        )
        in_blocks = moments is not None and set(moments[0].get("llm", {})) - set(LLM_VOCAB_PARAMS)
        if in_blocks and module.config.llm.scan_layers != model_config.llm.scan_layers:
            # State inside the LLM blocks (not the release's): relayout it with zeros beside it.
            moments = (
                relayout(_keep_matching(moments[0], params, fill=True)),
                relayout(_keep_matching(moments[1], params, fill=True)),
                moments[2],
            )
        params = relayout(params)
        loaded = module.config
        module = llm3d.LLM3D(model_config)
        if reinit or llm3d.grounding_settings(loaded) != llm3d.grounding_settings(model_config):
            params, new = llm3d.grow_params(module, params, seed=config.seed)
            # one entry per module (relevance/... has dozens of arrays)
            grown = sorted(
                {
                    "/".join(p.split("/")[:2]) if p.startswith("llm/") else p.split("/")[0]
                    for p in new
                }
            )
            print(f"{m.pretrained}: new params initialised at random: {', '.join(grown)}")
        if moments is not None:  # regrown params start from zero moments
            moments = (
                _keep_matching(moments[0], params),
                _keep_matching(moments[1], params),
                moments[2],
            )
        if with_optimizer and is_lavis_checkpoint(m.pretrained):
            _report_moments(config, m.pretrained, saved[0], params)
        return (module, params, moments) if with_optimizer else (module, params)
    model_config = preset_config(m.preset)
    if config.data_source == "tfds":
        if not config.tokenizer:
            raise InputError(
                None, "set config.model.pretrained, or config.tokenizer for a random-init model"
            )
        if not os.path.isdir(config.tokenizer):
            raise InputError(
                config.tokenizer,
                "tokenizer directory not found (make one with python -m llm3d_jax.tokens)",
            )
        if not os.path.isdir(config.data_dir):
            raise InputError(
                config.data_dir, "data directory not found (python -m data_pipeline.tfds)"
            )
        from llm3d_jax.data.pipeline import load_tokenizer, parse_mixture
        from llm3d_jax.data.sources import dataset_metadata

        # The base vocabulary ends where <loc0> goes (the tokenizer may hold the location
        # tokens already: python -m llm3d_jax.tokens adds them).
        try:
            offset = tokens.add_location_tokens(
                load_tokenizer(config.tokenizer), model_config.llm.loc_bins
            )
        except ValueError as err:
            raise InputError(config.tokenizer, str(err)) from None
        overrides["vocab_size"] = offset
        first = parse_mixture(config.data.datasets)[0][0]
        overrides["feature_dim"] = int(dataset_metadata(config.data_dir, first)["dim"])
    module = llm3d.LLM3D(_with_overrides(config, model_config, overrides))
    return (module, None, None) if with_optimizer else (module, None)


def _with_overrides(config, model_config: llm3d.LLM3DConfig, overrides: dict):
    """`llm3d.with_overrides`, its refusals as one-line input errors."""
    if profile(config) == "release" and not isinstance(model_config.llm, T5Config):
        raise InputError(
            config.model.pretrained or None,
            f"config.profile 'release' is the released 3D-LLM's FlanT5 recipe; this model's LLM "
            f"is {type(model_config.llm).__name__} (decoder-only): use config.profile 'ours'",
        )
    try:
        return llm3d.with_overrides(model_config, **overrides)
    except ValueError as err:
        raise InputError(None, f"config.model: {err}") from None


# LLM params outside its blocks: the same in the scanned and the unscanned layout.
LLM_VOCAB_PARAMS = ("shared", "lm_head", "loc_embed", "loc_head")


def _keep_matching(tree, params, fill: bool = False):
    """The leaves of `tree` (moments) whose path `params` has with the same shape; with `fill`,
    zeros for every other param of `params` (the full tree)."""
    old = traverse_util.flatten_dict(tree)
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        kept = old.get(path)
        if kept is not None and tuple(kept.shape) == tuple(value.shape):
            out[path] = kept
        elif fill:
            out[path] = np.zeros(value.shape, np.float32)
    return traverse_util.unflatten_dict(out)


def _report_moments(config, path: str, moments, params) -> None:
    """What the checkpoint's optimizer state becomes in this run (two lines at most)."""
    from llm3d_jax.convert.lavis import describe_moments

    print(f"{path}: {describe_moments(moments)}")
    if moments is None:
        return
    regexes = [re.compile(p) for p in trainable_patterns(config)]
    trains = lambda p: any(r.fullmatch(p) for r in regexes)
    covered = set(moments.covered)
    dropped = sorted(p for p in covered if not trains(p))
    paths = ("/".join(k) for k in traverse_util.flatten_dict(params))
    fresh = sorted(p for p in paths if trains(p) and p not in covered)
    notes = []
    if dropped:
        notes.append(
            f"the state of {len(dropped)} tensors frozen here is dropped ({', '.join(dropped[:4])})"
        )
    if fresh:
        notes.append(
            f"{len(fresh)} trainable tensors without state start from zero moments ({', '.join(fresh[:4])})"
        )
    if notes:
        print(f"{path}: " + "; ".join(notes))


def profile(config) -> str:
    """The run's profile: "ours" (also when the config has no `profile` key) or "release"."""
    return config.get("profile", "ours")


def trainable_patterns(config) -> tuple[str, ...]:
    """What trains in a run: `config.trainable`, else the profile's table (`llm3d.TRAINABLE`;
    the release profile's `llm3d.RELEASE_TRAINABLE` adds the T5 embedding table and LM head).
    Training, the optimizer-state report and restoring a run all split the params by it."""
    release = profile(config) == "release"
    return tuple(config.get("trainable", ())) or (
        llm3d.RELEASE_TRAINABLE if release else llm3d.TRAINABLE
    )


def preset_config(preset: str) -> llm3d.LLM3DConfig:
    """`config.model.preset` -> LLM3DConfig: a constructor name (tiny, demo, tiny_decoder, ...),
    optionally `NAME:ARG` for one argument (tiny_decoder:qwen2)."""
    name, _, arg = preset.partition(":")
    if name.startswith("_") or not hasattr(llm3d.LLM3DConfig, name):
        raise InputError(None, f"config.model.preset: LLM3DConfig has no preset {name!r}")
    try:
        return getattr(llm3d.LLM3DConfig, name)(*([arg] if arg else []))
    except (TypeError, ValueError) as err:
        raise InputError(None, f"config.model.preset {preset!r}: {err}") from None


def build_data(config, mesh, model_config, *, train: bool):
    """Global-batch iterator with get_state()/set_state()/reset(); `synthetic` needs no files."""
    batch_size = config.batch_size if train else config.eval_batch_size
    if config.data_source == "synthetic":
        from llm3d_jax.train.synthetic import SyntheticBatches

        return SyntheticBatches(
            batch_size=batch_size,
            num_points=config.data.num_points,
            feature_dim=model_config.feature_dim,
            prompt_len=config.data.prompt_len,
            answer_len=config.data.answer_len,
            vocab_size=model_config.llm.loc_offset,
            answer_offset=model_config.llm.loc_offset,
            seed=config.seed if train else config.seed + 1,
            sharding=sharding.batch_sharding(mesh),
        )
    if config.data_source != "tfds":
        raise InputError(
            None, f"config.data_source must be tfds or synthetic, not {config.data_source!r}"
        )
    from llm3d_jax.data import pipeline

    if not os.path.isdir(config.data_dir):
        raise InputError(
            config.data_dir, "data directory not found (build it with python -m data_pipeline.tfds)"
        )
    tokenizer = tokenizer_dir(config)
    common = dict(
        batch_size=batch_size,
        seed=config.seed,
        loc_bins=model_config.llm.loc_bins,
        profile=profile(config),
        **config.data,
    )
    if train:
        return pipeline.make_train_iterator(config.data_dir, tokenizer, mesh, **common)
    return pipeline.make_eval_iterator(config.data_dir, tokenizer, mesh, epochs=None, **common)


@dataclasses.dataclass(frozen=True)
class Training:
    """What the train step needs besides data: the optimizer and every sharding, all abstract
    (nothing allocated until `state_lib.init_random` / `init_from_params`)."""

    module: llm3d.LLM3D
    patterns: tuple[str, ...]  # regexes of the trainable param paths
    init_fn: object  # rng -> boxed params
    schedule: object
    tx: object
    trainable_abs: dict
    frozen_abs: dict
    state_sh: object
    frozen_sh: dict


def build_schedule(config):
    """`config.optim` -> the lr schedule: ours (warm-up then cosine per step to total_steps), or
    with the release profile the release's (per epoch, `optimizer.make_release_schedule`)."""
    o = config.optim
    if profile(config) == "release":
        return optimizer.make_release_schedule(
            lr=o.lr,
            min_lr=o.min_lr,
            warmup_lr=o.warmup_lr,
            warmup_steps=o.warmup_steps,
            steps_per_epoch=o.steps_per_epoch,
            max_epoch=o.max_epoch,
            first_epoch=o.get("first_epoch", 0),
        )
    return optimizer.make_schedule(
        lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, total_steps=config.total_steps
    )


def build_training(config, mesh, module: llm3d.LLM3D) -> Training:
    """Trainable / frozen split (`config.trainable`, else the profile's table), optimizer and
    schedule (`config.optim`, `config.total_steps`), state and param shardings on `mesh`."""
    patterns = trainable_patterns(config)
    example = llm3d.example_inputs(module.config)  # shapes for init only
    init_fn = lambda rng: module.init(rng, **example, deterministic=True)["params"]
    boxed = state_lib.abstract_params(init_fn)
    optimizer.check_trainable_patterns(nn.meta.unbox(boxed), patterns)
    trainable_abs, frozen_abs, trainable_sh, frozen_sh = state_lib.param_shardings(
        boxed, mesh, patterns
    )
    schedule = build_schedule(config)
    tx = optimizer.make_optimizer(
        trainable_abs,
        schedule,
        b1=config.optim.b1,
        b2=config.optim.b2,
        weight_decay=config.optim.weight_decay,
        grad_clip=config.optim.grad_clip,
    )
    state_sh = state_lib.state_shardings(tx, trainable_abs, trainable_sh, mesh)
    return Training(
        module, patterns, init_fn, schedule, tx, trainable_abs, frozen_abs, state_sh, frozen_sh
    )


def abstract_batch(config, model_config, mesh, batch_size: int | None = None) -> dict:
    """ShapeDtypeStructs of one global training batch (the data pipeline's shapes), sharded."""
    batch = batch_size or config.batch_size
    n, lp, la = config.data.num_points, config.data.prompt_len, config.data.answer_len
    shapes = llm3d.example_inputs(model_config, batch=batch, points=n, prompt_len=lp, answer_len=la)
    if config.data_source == "tfds":  # the pipeline's per-point targets (data.preprocess)
        shapes["point_target"] = jax.ShapeDtypeStruct((batch, n), jnp.int8)
    data_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh) for k, v in shapes.items()}


def compile_train_step(
    config, mesh, training: Training, batch_abs: dict, frozen_abs=None, scenes=None
):
    """The jitted train step (state donated), lowered for `batch_abs` and compiled on `mesh`.
    `frozen_abs`: the frozen params (arrays or ShapeDtypeStructs; default: abstract ones).
    `scenes`: the training iterator's device scene cache (`data.scene_cache = "device"`,
    `llm3d_jax.data.scene_cache.DeviceScenes`): the batch then names the points, the step
    samples and gathers them first, and the compiled step takes `scenes.arrays` as a fifth
    argument."""
    data_sh = sharding.batch_sharding(mesh)
    if frozen_abs is None:
        frozen_abs = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            training.frozen_abs,
            training.frozen_sh,
        )
    train_step = step_lib.make_train_step(
        training.module,
        training.tx,
        training.schedule,
        config.microbatches,
        rating_weight=config.get("rating_loss_weight", 1.0),
        role_teacher=config.get("role_teacher", 0.0),
    )
    in_shardings = (training.state_sh, training.frozen_sh, data_sh, sharding.replicated(mesh))
    cache_args = ()
    if scenes is not None:
        from llm3d_jax.data import scene_cache

        train_step = scene_cache.gathering_step(train_step, scenes.spec)
        in_shardings += (scenes.shardings,)
        cache_args = (scenes.arrays,)
    train_step = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(training.state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    abstract_state = state_lib.abstract_state(
        training.tx, training.trainable_abs, training.state_sh
    )
    with jax.set_mesh(mesh):
        return train_step.lower(
            abstract_state, frozen_abs, batch_abs, jax.random.key(0), *cache_args
        ).compile()
