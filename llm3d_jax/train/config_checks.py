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
    "optim.warmup_steps": 0,
}
# setting -> (low, high, low is allowed) for floats.
FLOAT_RANGES = {
    "optim.lr": (0.0, math.inf, False),
    "optim.min_lr": (0.0, math.inf, True),
    "optim.b1": (0.0, 1.0, True),
    "optim.b2": (0.0, 1.0, True),
    "optim.weight_decay": (0.0, math.inf, True),
    "optim.grad_clip": (0.0, math.inf, False),
    "model.dropout": (0.0, 1.0, True),
}


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
    lr, min_lr = _get(config, "optim.lr"), _get(config, "optim.min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        raise InputError(None, f"config.optim.min_lr {min_lr} must be <= config.optim.lr {lr}")
