"""Constrained decoding of location tokens (llm3d_jax.infer.decode.location_mask): whatever the
model's logits, every location run is a point (3 tokens) or whole boxes (6k, max >= min)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.infer.decode import DecodeConfig, decode, location_mask

VOCAB, LOC_OFFSET, LOC_BINS, EOS, PAD = 40, 8, 32, 1, 0


def _adversarial_step(seed: int, vocab: int = VOCAB):
    """A stand-in model whose logits favour location tokens in descending order and EOS at
    random moments: unconstrained, it ends runs mid-box and writes max < min."""
    key = jax.random.key(seed)

    def logits_at(t, rows):
        noise = jax.random.normal(jax.random.fold_in(key, t), (rows, vocab)) * 3.0
        descending = jnp.where(jnp.arange(vocab) >= LOC_OFFSET, 2.0 - 0.1 * jnp.arange(vocab), 0.0)
        return noise + descending

    def step(cache, token_ids):
        t = cache["t"]  # [rows], all equal: the step number
        return logits_at(t[0], token_ids.shape[0]), {"t": t + 1}

    return step, logits_at


def _runs(row: np.ndarray):
    """The location runs of one decoded row (up to EOS) as lists of bin indices."""
    runs, current = [], []
    for tok in row:
        if tok == EOS or tok == PAD:
            break
        if LOC_OFFSET <= tok < LOC_OFFSET + LOC_BINS:
            current.append(int(tok) - LOC_OFFSET)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _well_formed(run: list[int]) -> bool:
    if len(run) == 3:
        return True
    if len(run) == 0 or len(run) % 6:
        return False
    boxes = np.asarray(run).reshape(-1, 6)
    return bool(np.all(boxes[:, 3:] >= boxes[:, :3]))


def _decode(config: DecodeConfig, seed: int = 0, rows: int = 64):
    step, logits_at = _adversarial_step(seed)
    rows_logits = logits_at(0, rows)
    cache = {"t": jnp.ones((rows,), jnp.int32)}
    tokens, _ = jax.jit(lambda c, first, r: decode(step, c, first, config, r))(
        cache, rows_logits, jax.random.key(seed)
    )
    return np.asarray(tokens)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("max_new_tokens", [7, 13])
def test_constrained_decoding_never_emits_a_malformed_run(strategy, max_new_tokens):
    common = dict(strategy=strategy, max_new_tokens=max_new_tokens, eos_id=EOS, pad_id=PAD)
    constrained = DecodeConfig(**common, loc_offset=LOC_OFFSET, loc_bins=LOC_BINS)
    runs = [r for row in _decode(constrained) for r in _runs(row)]
    free_runs = [r for row in _decode(DecodeConfig(**common)) for r in _runs(row)]
    assert runs, "the stand-in model should write location runs"
    assert all(_well_formed(r) for r in runs), [r for r in runs if not _well_formed(r)][:3]
    # without the grammar the same logits give malformed runs: the test can fail
    assert not all(_well_formed(r) for r in free_runs)


def test_location_mask_rules():
    """Spot checks of the grammar at each phase of a box."""
    max_len = 10
    loc = lambda i: LOC_OFFSET + i  # noqa: E731
    history = jnp.asarray(
        [
            [5, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # t=1, run 0: anything
            [loc(3), loc(4), 0, 0, 0, 0, 0, 0, 0, 0],  # t=2, run 2: location only
            [loc(3), loc(4), loc(5), 0, 0, 0, 0, 0, 0, 0],  # t=3, run 3: stop or xmax >= 3
            [loc(3), loc(4), loc(5), loc(7), 0, 0, 0, 0, 0, 0],  # t=4: ymax >= 4, no stop
        ]
    )
    expect_other = [True, False, True, False]
    expect_lowest = [0, 0, 3, 4]
    for row, t in enumerate([1, 2, 3, 4]):
        allowed = np.asarray(
            location_mask(history[row : row + 1], t, max_len, VOCAB, LOC_OFFSET, LOC_BINS)
        )[0]
        assert allowed[EOS] == expect_other[row], row
        locs = np.flatnonzero(allowed[LOC_OFFSET:])
        assert locs.min() == expect_lowest[row] and locs.max() == LOC_BINS - 1, row
    # no room left for a point: a run may not start
    short = jnp.zeros((1, 4), jnp.int32)
    allowed = np.asarray(location_mask(short, 2, 4, VOCAB, LOC_OFFSET, LOC_BINS))[0]
    assert not allowed[LOC_OFFSET:].any() and allowed[EOS]
