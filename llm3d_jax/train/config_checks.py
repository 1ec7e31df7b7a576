"""Value checks of a training config (experiments/configs/*.py plus --config.* overrides),
run before anything is built or compiled: a zero batch, negative steps or a negative learning
rate must be one line naming the setting, not a traceback deep in grain or a run that trains
to nonsense.
"""

from __future__ import annotations

import math

from llm3d_jax.fileio import InputError

# setting -> smallest allowed value (ints). Settings a config leaves out are not checked.
MIN_INTS = {
    "total_steps": 1,
    "batch_size": 1,
    "microbatches": 1,
    "eval_batch_size": 1,
    "eval_every": 0,
    "eval_steps": 1,
    "eval_generate_batches": 0,
    "log_every": 1,
    "checkpoint_every": 0,
    "keep_checkpoints": 1,
    "data.num_points": 1,
    "data.prompt_len": 1,
    "data.answer_len": 1,
    "data.read_threads": 1,
    "data.worker_count": 0,
    "optim.warmup_steps": 0,
    "optim.steps_per_epoch": 1,  # the release profile's epoch-stepped schedule
    "optim.max_epoch": 1,
    "optim.first_epoch": 0,
}
# setting -> (low, high, low is allowed) for floats.
FLOAT_RANGES = {
    "optim.lr": (0.0, math.inf, False),
    "optim.min_lr": (0.0, math.inf, True),
    "optim.b1": (0.0, 1.0, True),
    "optim.b2": (0.0, 1.0, True),
    "optim.weight_decay": (0.0, math.inf, True),
    "optim.warmup_lr": (0.0, math.inf, True),
    "optim.grad_clip": (0.0, math.inf, True),  # 0: no clipping
    "model.dropout": (0.0, 1.0, True),
    "data.scene_cache_budget_gb": (0.0, math.inf, False),
}
PROFILES = ("ours", "release")  # llm3d_jax.data.preprocess.PROFILES (data may not be imported)
SCENE_CACHES = ("host", "device")  # llm3d_jax.data.pipeline.SCENE_CACHES
# What the release profile's schedule (optimizer.make_release_schedule) reads.
RELEASE_OPTIM = ("warmup_lr", "steps_per_epoch", "max_epoch")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_config(config) -> None:
    """InputError(None, "config.<setting>: ...") for the first value out of range."""
    for name, minimum in MIN_INTS.items():
        value = _get(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(None, f"config.{name}: expected an integer, got {value!r}")
        if value < minimum:
            raise InputError(None, f"config.{name} must be >= {minimum}, got {value}")
    for name, (low, high, low_ok) in FLOAT_RANGES.items():
        value = _get(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(None, f"config.{name}: expected a number, got {value!r}")
        if (
            not math.isfinite(value)
            or value < low
            or (value == low and not low_ok)
            or value >= high
        ):
            if name in ("optim.b1", "optim.b2", "model.dropout"):
                bounds = "in [0, 1)"
            else:
                bounds = ">= 0" if low_ok else "> 0"
            raise InputError(None, f"config.{name} must be {bounds}, got {value}")
    teacher = _get(config, "role_teacher")  # a share of rows: 1 included
    if teacher is not None and (
        isinstance(teacher, bool) or not isinstance(teacher, (int, float)) or not 0 <= teacher <= 1
    ):
        raise InputError(None, f"config.role_teacher must be in [0, 1], got {teacher!r}")
    lr, min_lr = _get(config, "optim.lr"), _get(config, "optim.min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        raise InputError(None, f"config.optim.min_lr {min_lr} must be <= config.optim.lr {lr}")
    cache = _get(config, "data.scene_cache")
    if cache is not None and cache not in SCENE_CACHES:
        raise InputError(
            None, f"config.data.scene_cache must be one of {SCENE_CACHES}, got {cache!r}"
        )
    profile = _get(config, "profile")
    if profile is None:
        return
    if profile not in PROFILES:
        raise InputError(None, f"config.profile must be one of {PROFILES}, got {profile!r}")
    if profile == "release":
        lacking = [k for k in RELEASE_OPTIM if _get(config, f"optim.{k}") is None]
        if lacking:
            raise InputError(
                None,
                f"config.profile release steps lr per epoch and needs config.optim."
                f"{', config.optim.'.join(lacking)} (experiments/configs/scanqa_3dllm_release.py)",
            )
        o = config.optim
        epochs = o.max_epoch - o.get("first_epoch", 0)
        if epochs * o.steps_per_epoch < (_get(config, "total_steps") or 0):
            raise InputError(
                None,
                f"config.total_steps {config.total_steps} runs past the release schedule's last "
                f"epoch ({epochs} epochs of {o.steps_per_epoch} steps)",
            )
