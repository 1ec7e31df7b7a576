"""Full model params of a training run: trainable params from an orbax checkpoint, frozen ones
regenerated (random init) or reloaded (pretrained directory), checked against the fingerprint the
checkpoint recorded (`llm3d_jax.train.checkpoint`).

`load_run(path)` gives the whole trained model (experiments/eval.py, tools/export.py);
`load_pretrained(config)` the model a run config starts from (experiments/eval.py --pretrained:
a released LAVIS .pth evaluated directly).
Accepted locations: a run folder (RUN, holding checkpoints/), its checkpoints folder, or one step
folder (RUN/checkpoints/300). The trainable params are restored onto one device from the array
metadata stored in the checkpoint, so neither the optimizer nor the training mesh is needed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from llm3d_jax.fileio import InputError
from llm3d_jax.model import llm3d
from llm3d_jax.train import checkpoint as ckpt
from llm3d_jax.train import optimizer, setup


def locate(path: str) -> tuple[str, int | None]:
    """-> (checkpoints folder, step or None for the latest)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise InputError(path, "checkpoint folder not found")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    name = os.path.basename(path)
    if name.isdigit() and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        return os.path.dirname(path), int(name)
    return path, None


def read_checkpoint(path: str) -> tuple[int, dict, dict]:
    """-> (step, trainable params as host numpy arrays, checkpoint meta with `frozen`, `config`).

    InputError when there is no complete step, the step lacks an item, or it cannot be read.
    """
    directory, step = locate(path)
    manager = ocp.CheckpointManager(
        directory,
        item_names=(ckpt.STATE, ckpt.META),
        item_handlers={
            ckpt.STATE: ocp.StandardCheckpointHandler(),
            ckpt.META: ocp.JsonCheckpointHandler(),
        },
    )
    steps = manager.all_steps()
    if not steps:
        raise InputError(directory, "no complete checkpoint step in this folder")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise InputError(directory, f"no complete checkpoint step {step} (have {sorted(steps)})")
    step_dir = os.path.join(directory, str(step))
    missing = [i for i in (ckpt.STATE, ckpt.META) if not os.path.isdir(os.path.join(step_dir, i))]
    if missing:
        raise InputError(step_dir, f"incomplete checkpoint: missing {', '.join(missing)}")
    problem = None
    try:
        with ckpt.settled_event_loops():
            tree = manager.item_metadata(step)[ckpt.STATE]
            tree = getattr(tree, "tree", tree)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
            )
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        ckpt.STATE: ocp.args.StandardRestore(abstract),
                        ckpt.META: ocp.args.JsonRestore(),
                    }
                ),
            )
    except Exception as err:  # a damaged step can fail in any layer (json, tensorstore)
        problem = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    finally:
        manager.close()
    if problem is not None:
        raise InputError(step_dir, f"unreadable checkpoint ({problem})")
    state, meta = restored[ckpt.STATE], restored[ckpt.META]
    if not isinstance(meta, dict) or "frozen" not in meta or "params" not in state:
        raise InputError(step_dir, "not a llm3d_jax training checkpoint (no params / frozen ref)")
    return step, jax.tree.map(np.asarray, state["params"]), meta


def merge_with_frozen(trainable: dict, all_params: dict, patterns, expected: str, where: str):
    """Trainable params from the checkpoint + the frozen part of `all_params` -> full params.

    `expected` is the checkpoint's frozen fingerprint; a mismatch (other base weights, other
    seed, other model config) is an InputError naming `where`.
    """
    _, frozen = optimizer.split_trainable(all_params, patterns)
    got = ckpt.fingerprint(frozen)
    if got != expected:
        raise InputError(
            where,
            f"frozen weights differ from the ones the checkpoint was trained with "
            f"(fingerprint {got} vs {expected})",
        )
    params = optimizer.merge(trainable, frozen)
    want = jax.tree.structure(all_params)
    if jax.tree.structure(params) != want:
        raise InputError(where, "checkpoint params do not match the model's parameter tree")
    return params


class RunModel:
    """A trained model restored from a run: module, full params, run config, tokenizer path."""

    def __init__(self, module, params, config, step: int, source: str):
        self.module, self.params, self.config, self.step, self.source = (
            module,
            params,
            config,
            step,
            source,
        )

    @property
    def tokenizer_path(self) -> str:
        path = setup.tokenizer_dir(self.config)
        if not path:
            raise InputError(self.source, "the run config names no tokenizer directory")
        if not os.path.isdir(path):
            raise InputError(path, "tokenizer directory of the run not found")
        return path


def load_run(path: str) -> RunModel:
    """A run folder, its checkpoints folder or one step folder -> RunModel (full fp32 params)."""
    step, trainable, meta = read_checkpoint(path)
    config = ml_collections.ConfigDict(meta.get("config") or _config_json(path))
    module, pretrained = setup.build_model(config)  # the exact model the run trained
    patterns = setup.trainable_patterns(config)  # as the run split them
    frozen_ref = meta["frozen"]
    if pretrained is None:
        all_params = random_init(module, int(frozen_ref["seed"]))
    else:
        all_params = pretrained
    params = merge_with_frozen(trainable, all_params, patterns, frozen_ref["fingerprint"], path)
    return RunModel(module, params, config, step, path)


def load_pretrained(config) -> RunModel:
    """The model a run config starts from, evaluated as it is (no training checkpoint): its
    `model.pretrained`, e.g. a released LAVIS .pth over its BLIP-2 directory `model.base`."""
    if not config.model.get("pretrained"):
        raise InputError(None, "config.model.pretrained: no pretrained model to evaluate")
    module, params = setup.build_model(config)
    return RunModel(module, params, config, 0, config.model.pretrained)


def read_config(path: str) -> ml_collections.ConfigDict:
    """A run config from a file: a run's config.json (what experiments/train.py writes) or an
    experiments/configs/*.py file (its `get_config()`, as train.py's --config runs it)."""
    if not os.path.isfile(path):
        raise InputError(path, "config file not found")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                return ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as err:
            raise InputError(path, f"unreadable run config ({err})") from None
    if not path.endswith(".py"):
        raise InputError(path, "expected a run config.json or an experiments/configs/*.py file")
    spec = importlib.util.spec_from_file_location("llm3d_run_config", path)
    config_module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(config_module)
        config = config_module.get_config()
    except Exception as err:  # a config file is code: any failure is one line
        raise InputError(path, f"config file failed ({type(err).__name__}: {err})") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(path, "get_config() did not return an ml_collections ConfigDict")
    return config


@functools.lru_cache(maxsize=2)
def random_init(module, seed: int) -> dict:
    """Host params of a random init (cached: export and eval in one process restore twice)."""
    return jax.device_get(llm3d.init_params(module, seed=seed))


def _config_json(path: str) -> dict:
    run_dir = os.path.dirname(locate(path)[0])
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise InputError(path, "checkpoint has no config and the run folder no config.json")
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)
