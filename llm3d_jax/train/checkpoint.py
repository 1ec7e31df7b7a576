"""Orbax checkpoints of what trains, plus a reference to (not a copy of) the frozen base weights.

A checkpoint step holds three items:
- `state`: the TrainState (step, trainable params, optimizer state), sharded arrays;
- `data`: the data iterator's state, one JSON file per process (grain's handler);
- `meta`: JSON with `frozen`: where the frozen weights come from (a pretrained directory and the
  sha256 of its files, or the seed and model config that regenerate a random init) and a
  fingerprint of their values that a resumed run checks before training on.

Saves are asynchronous; the manager keeps the last `keep`. Orbax writes a step into a temporary
folder and renames it when complete, so a run killed mid-save leaves no listed partial step; a
step that is listed but unreadable (corrupt) is skipped with a warning by `restore_latest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, META = "state", "data", "meta"


class IteratorState:
    """Adapts a data iterator with `get_state() -> dict` / `set_state(dict)` (JSON-able) to the
    bytes interface of grain's per-process checkpoint handler."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


def make_manager(directory: str, keep: int, save_every: int) -> ocp.CheckpointManager:
    """`save_every` 0: no periodic saves (train.py still saves the final step, forced)."""
    if save_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {save_every}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # None: orbax keeps only its initial save (the first step of a fresh run)
        save_interval_steps=save_every or None,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # leftovers of a save killed half-way
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=(STATE, DATA, META)
    )


def save(manager, step: int, state, data_iterator, meta: dict, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it saved."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: grain.checkpoint.CheckpointSave(IteratorState(data_iterator)),
                META: ocp.args.JsonSave(meta),
            }
        ),
        force=force,
    )


class _SettlingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first runs the tasks it still holds to completion.

    Orbax runs each restore in a fresh loop (`run_until_complete`, then `close`). When one
    array of a corrupt step fails, `asyncio.gather` raises at once and the loop is closed while
    the other arrays' tensorstore reads are still in flight; each of those reads completes later
    on a tensorstore thread and calls `loop.call_soon_threadsafe` on the closed loop, which
    prints a 'RuntimeError: Event loop is closed' traceback (hundreds per step). Letting the
    leftover tasks finish (their reads fail or succeed; results and errors are dropped) before
    the loop closes leaves no callback that could still reach it. Tasks still running after
    SETTLE_S (a read that hangs) are cancelled instead, which unregisters their callbacks.
    """

    SETTLE_S = 60.0

    def close(self) -> None:
        while not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            if not pending:
                break
            settle = asyncio.gather(*pending, return_exceptions=True)
            try:
                self.run_until_complete(asyncio.wait_for(settle, self.SETTLE_S))
            except TimeoutError:  # wait_for has cancelled them and waited for that
                pass
        super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingEventLoop()


@contextlib.contextmanager
def settled_event_loops():
    """Event loops created inside (orbax's, one per restore) finish their tasks before closing,
    so a restore that fails part-way leaves no tensorstore read behind (see _SettlingEventLoop)."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def restore_latest(manager, abstract_state, data_iterator):
    """-> (state, meta) from the newest readable step, or None when there is none.

    `abstract_state` holds ShapeDtypeStructs with shardings (the restored arrays land there).
    A step that fails to restore is reported on stderr in one line and the previous one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            with settled_event_loops():
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            STATE: ocp.args.StandardRestore(abstract_state),
                            DATA: grain.checkpoint.CheckpointRestore(IteratorState(data_iterator)),
                            META: ocp.args.JsonRestore(),
                        }
                    ),
                )
        except Exception as err:  # a corrupt step can fail in any layer (json, tensorstore)
            restored, problem = None, f"{type(err).__name__}: {' '.join(str(err).split())}"
        if restored is None:
            print(
                f"warning: checkpoint step {step} in {manager.directory} is unreadable, skipped "
                f"({problem[:200]}); trying the previous one",
                file=sys.stderr,
            )
            continue
        return restored[STATE], restored[META]
    return None


@jax.jit
def _fingerprint_words(tree):
    """Two uint32 words mixing every bit of every leaf with its position; sums of uint32 wrap
    exactly, so the result does not depend on how the arrays are sharded."""
    words = jnp.zeros((2,), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        x = leaf.astype(jnp.float32) if leaf.dtype != jnp.float32 else leaf
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        index = jnp.zeros(x.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(x.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
            stride *= x.shape[d]
        for w, (a, b) in enumerate(((0x9E3779B1, 0x85EBCA6B), (0xC2B2AE35, 0x27D4EB2F))):
            h = bits ^ (index * jnp.uint32(a) + jnp.uint32(i + 1))
            h = h * jnp.uint32(b)
            h = h ^ (h >> 15)
            h = h * jnp.uint32(a)
            words = words.at[w].add(jnp.sum(h, dtype=jnp.uint32))
    return words


def fingerprint(tree) -> str:
    """16 hex digits identifying the exact values (and layout) of a params pytree."""
    words = np.asarray(jax.device_get(_fingerprint_words(tree)))
    return "".join(f"{int(w):08x}" for w in words) + f"-{len(jax.tree.leaves(tree))}"


def file_hashes(path: str) -> dict[str, str]:
    """sha256 of every weight / config file of a pretrained directory, or of one checkpoint
    file (a LAVIS .pth)."""
    if os.path.isfile(path):
        directory, names = os.path.dirname(path), [os.path.basename(path)]
    else:
        directory = path
        names = [n for n in sorted(os.listdir(path)) if n.endswith((".safetensors", ".json"))]
    out = {}
    for name in names:
        digest = hashlib.sha256()
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        out[name] = digest.hexdigest()
    return out
