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

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time

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


# What tensorstore prints for each read still in flight when orbax gives up on a corrupt step
# and closes its event loop: the read cannot wake the closed loop. Printed from C (not through
# sys.stderr or the exception hooks) by several threads at once, so the tracebacks' lines
# interleave; hundreds per step, while and after the restore fails. They say nothing the
# one-line warning of `restore_latest` does not, so their lines are dropped one by one.
_CLOSED_LOOP_LINE = re.compile(
    r"Traceback \(most recent call last\):"
    r'|  File ".*asyncio.base_events\.py", line \d+, in (?:call_soon_threadsafe|_check_closed)'
    r"|    self\._check_closed\(\)"
    r"|    raise RuntimeError\('Event loop is closed'\)"
    r"|RuntimeError: Event loop is closed"
)


@contextlib.contextmanager
def closed_loop_noise_dropped():
    """Captures file descriptor 2 while the body runs; on leaving, writes back everything but
    the closed-loop tracebacks. Yields `drain()`: waits until the capture has been quiet for a
    second (at most ten), so reads that finish after a failed restore are captured too."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)

        def drain(quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
            size, quiet_since, start = -1, time.monotonic(), time.monotonic()
            while time.monotonic() - start < limit_s:
                now_size = os.fstat(capture.fileno()).st_size
                if now_size != size:
                    size, quiet_since = now_size, time.monotonic()
                elif time.monotonic() - quiet_since >= quiet_s:
                    return
                time.sleep(0.1)

        try:
            yield drain
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(x for x in lines if not _CLOSED_LOOP_LINE.fullmatch(x.rstrip("\n")))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def restore_latest(manager, abstract_state, data_iterator):
    """-> (state, meta) from the newest readable step, or None when there is none.

    `abstract_state` holds ShapeDtypeStructs with shardings (the restored arrays land there).
    A step that fails to restore is reported on stderr in one line and the previous one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        with closed_loop_noise_dropped() as drain:
            try:
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
                drain()
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


def file_hashes(directory: str) -> dict[str, str]:
    """sha256 of every weight / config file of a pretrained directory."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".json")):
            digest = hashlib.sha256()
            with open(os.path.join(directory, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
            out[name] = digest.hexdigest()
    return out
