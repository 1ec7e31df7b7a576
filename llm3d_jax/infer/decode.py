"""Autoregressive decoding loops over a KV-cached step function: greedy, sampling, beam search.

The loops are family-agnostic: they see the model only through

    step_fn(cache, token_ids [B] int32) -> (logits [B,V], cache)

(`llm3d.decode_step` with the module and params closed over) plus the first-token logits and the
cache that `llm3d.prefill` returns. Every array in the cache has the batch on axis 0, so beam
search can expand and reorder it with `jnp.repeat` / `jnp.take`. All loops are pure, run inside
`jax.lax.while_loop` (leaving early once every row has emitted EOS) and have static output shapes
[B, max_len]; positions after EOS hold `pad_id`, EOS itself is kept.

The penalties follow transformers' `generate` on the same logits (`process_scores`):
`repetition_penalty` divides the positive and multiplies the negative scores of every token
already in the sequence, `no_repeat_ngram_size` forbids a token that would repeat an n-gram of
the sequence, `min_new_tokens` forbids EOS before that many tokens. The sequence, as
transformers counts it, starts with the decoder start token for encoder-decoder models (`start_id`,
T5: pad) and holds no prompt for decoder-only models fed embeddings (`start_id` None). Greedy
and sampling apply them to the logits, beam search to the log-probabilities (no renormalisation),
as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Cache = Any
StepFn = Callable[[Cache, jax.Array], tuple[jax.Array, Cache]]

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Hashable: it is a static argument of the jitted generate function.

    strategy: greedy | sample | beam. max_new_tokens: answer tokens including EOS (the released
    3D-LLM answers with up to 40). Beam search ranks finished beams by
    `sum log p / length ** length_penalty` (0 = plain log-probability; keeps width 1 == greedy;
    transformers' default is 1.0, negative favours short answers). `early_stopping` as in
    transformers: "never" (default here) stops once no alive beam can beat the worst kept finished
    one (exact), False (transformers' default) judges that by the alive beam's current length,
    True stops a row as soon as it holds `num_beams` finished beams.
    Sampling draws from softmax(logits / temperature) restricted to the `top_k` best tokens
    (0 = all) and to the smallest set whose probability reaches `top_p` (1.0 = all).
    repetition_penalty (1.0 = off), no_repeat_ngram_size (0 = off), min_new_tokens (0 = off) and
    start_id: as transformers' `generate` (module doc); LAVIS' `min_len` L for FlanT5 counts the
    start token, i.e. min_new_tokens L - 1.
    """

    strategy: str = "greedy"
    max_new_tokens: int = 40
    eos_id: int = 1
    pad_id: int = 0
    num_beams: int = 4
    length_penalty: float = 0.0
    early_stopping: bool | str = "never"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    start_id: int | None = None
    # Location grammar (`location_mask`): with loc_bins > 0, once a location token starts a run
    # the run becomes a point (3 tokens) or whole boxes (6k) with min <= max on every axis.
    loc_offset: int = 0
    loc_bins: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}")
        if not (self.early_stopping is True or self.early_stopping is False) and (
            self.early_stopping != "never"
        ):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError(
                "no_repeat_ngram_size and min_new_tokens must be >= 0, got "
                f"{self.no_repeat_ngram_size}, {self.min_new_tokens}"
            )
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0 (use strategy='greedy' for argmax)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.loc_bins < 0 or (self.loc_bins and self.loc_offset < 1):
            raise ValueError(
                f"loc_bins must be >= 0 and loc_offset >= 1, got {self.loc_bins}, {self.loc_offset}"
            )


EARLY_STOPPING = {"never": "never", "heuristic": False, "true": True}  # option -> field value
# How the released 3D-LLM decodes a task, where it differs from the options' defaults: its
# inference.py describes an Objaverse object greedily with repetition_penalty 1.5 and at most 50
# new tokens (its length_penalty 1.2 changes nothing in greedy decoding). tools/ask.py --task
# starts from these; an option given on the command line wins.
TASK_DECODING = {"object_caption": dict(repetition_penalty=1.5, max_new_tokens=50)}


def add_decode_arguments(parser) -> None:
    """The decoding options of every command that generates (experiments/eval.py, tools/ask.py);
    `decode_settings` turns them into DecodeConfig fields."""
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--length_penalty", type=float, default=0.0, help="beam: logp / len**lp")
    parser.add_argument(
        "--early_stopping",
        choices=tuple(EARLY_STOPPING),
        default="never",
        help="beam: transformers' early_stopping 'never' (exact), False (heuristic), True",
    )
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0: off")
    parser.add_argument("--no_repeat_ngram_size", type=int, default=0, help="0: off")
    parser.add_argument(
        "--min_new_tokens", type=int, default=0, help="no EOS before this many answer tokens"
    )
    parser.add_argument(
        "--free_locations",
        action="store_true",
        help="decode location tokens without the grammar (by default a started location run "
        "always becomes a point or whole boxes with min <= max)",
    )


def decode_settings(args) -> dict:
    """The DecodeConfig fields `add_decode_arguments`' options set (the grammar's loc_offset /
    loc_bins only with --free_locations: 0, off); ValueError when they do not make a config."""
    settings = dict(
        strategy=args.strategy,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        length_penalty=args.length_penalty,
        early_stopping=EARLY_STOPPING[args.early_stopping],
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_new_tokens,
    )
    if args.free_locations:
        settings.update(loc_offset=0, loc_bins=0)
    DecodeConfig(**settings)
    return settings


def location_mask(history: jax.Array, t, max_len: int, vocab: int, loc_offset: int, loc_bins: int):
    """Which tokens may come at position `t` so that every location run stays well formed.

    history: int [R, max_len], the tokens so far (positions >= t are ignored) -> bool [R, vocab].
    A run of consecutive location tokens must end as a point (3) or as whole boxes (6k, each
    `xmin ymin zmin xmax ymax zmax` with max >= min): inside a run only location tokens are
    allowed, a max coordinate only from its min on, and a run is started or extended only when it
    can still be completed before `max_len`. Outside a run everything is allowed.
    """
    rows = history.shape[0]
    position = jnp.arange(max_len)
    before = position[None, :] < t
    is_loc = (history >= loc_offset) & (history < loc_offset + loc_bins) & before
    # run length: positions since the last non-location token before t
    last_other = jnp.max(jnp.where(before & ~is_loc, position[None, :], -1), axis=1)  # [R]
    run = t - 1 - last_other
    phase = run % 6

    def need_after(length):  # tokens still needed once the run has `length` tokens
        return jnp.where(length <= 3, 3 - length, (6 - length % 6) % 6)

    room = max_len - 1 - t  # tokens that can still follow position t
    loc_ok = need_after(run + 1) <= room
    # a max coordinate (phase 3, 4, 5 of a box) is at least its min, 3 tokens back
    lower = jnp.take_along_axis(history, jnp.clip(t - 3, 0, max_len - 1)[None, None], axis=1)
    lower = jnp.where((run >= 3) & (phase >= 3), lower[:, 0] - loc_offset, 0)
    other_ok = (run == 0) | (run == 3) | ((run > 0) & (phase == 0))
    ids = jnp.arange(vocab)[None, :]
    loc_id = (ids >= loc_offset) & (ids < loc_offset + loc_bins)
    loc_allowed = loc_ok[:, None] & (ids - loc_offset >= lower[:, None])
    allowed = jnp.where(loc_id, loc_allowed, other_ok[:, None])
    return jnp.broadcast_to(allowed, (rows, vocab))


def constrain(logits: jax.Array, history, t, max_len: int, loc_offset: int, loc_bins: int):
    """logits [R,V] with the tokens `location_mask` forbids set to -inf (no-op for loc_bins 0)."""
    if not loc_bins:
        return logits
    allowed = location_mask(history, t, max_len, logits.shape[-1], loc_offset, loc_bins)
    return jnp.where(allowed, logits, -jnp.inf)


def ngram_ban(seq: jax.Array, length, n: int, vocab: int) -> jax.Array:
    """Tokens that would repeat an n-gram: bool [R, vocab].

    seq int [R, S] holds the sequence in its first `length` positions (the rest is ignored). A
    token is banned when the last n - 1 tokens followed by it form an n-gram already in the
    sequence (transformers' NoRepeatNGramLogitsProcessor). Nothing is banned before n tokens.
    """
    rows, size = seq.shape
    banned = jnp.zeros((rows, vocab), bool)
    windows = size - n + 1
    if windows <= 0:
        return banned
    grams = jnp.stack([seq[:, j : j + windows] for j in range(n)], axis=-1)  # [R, windows, n]
    # a window counts when it lies inside the sequence: it ends at i + n - 1 <= length - 1
    match = jnp.broadcast_to(jnp.arange(windows) <= length - n, (rows, windows))
    if n > 1:
        start = jnp.maximum(length - n + 1, 0)
        suffix = jax.lax.dynamic_slice_in_dim(seq, start, n - 1, axis=1)  # the last n - 1 tokens
        match = match & jnp.all(grams[..., :-1] == suffix[:, None, :], axis=-1)
    ids = jnp.where(match, grams[..., -1], vocab)
    return banned.at[jnp.arange(rows)[:, None], ids].set(True, mode="drop")


def process_scores(
    scores: jax.Array,
    history: jax.Array,
    t,
    *,
    max_len: int,
    eos_id: int,
    loc_offset: int = 0,
    loc_bins: int = 0,
    start_id: int | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
) -> jax.Array:
    """Scores [R,V] of position `t` after the penalties (module doc) and the location grammar.

    history: int [R, max_len], the tokens generated so far (positions >= t are ignored). Forbidden
    tokens get -inf. Without penalties and grammar the scores come back unchanged.
    """
    rows, vocab = scores.shape
    if start_id is None:
        seq, length = history, t
    else:
        seq = jnp.concatenate([jnp.full((rows, 1), start_id, history.dtype), history], axis=1)
        length = t + 1
    if repetition_penalty != 1.0:
        scores = scores.astype(jnp.float32)
        ids = jnp.where(jnp.arange(seq.shape[1])[None, :] < length, seq, vocab)
        seen = jnp.zeros((rows, vocab), bool)
        seen = seen.at[jnp.arange(rows)[:, None], ids].set(True, mode="drop")
        penalised = jnp.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = jnp.where(seen, penalised, scores)
    if no_repeat_ngram_size > 0:
        scores = jnp.where(ngram_ban(seq, length, no_repeat_ngram_size, vocab), -jnp.inf, scores)
    if min_new_tokens > 0:
        early_eos = (jnp.arange(vocab) == eos_id)[None, :] & (t < min_new_tokens)
        scores = jnp.where(early_eos, -jnp.inf, scores)
    return constrain(scores, history, t, max_len, loc_offset, loc_bins)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / top-p (nucleus) set to -inf.

    logits: [B,V] -> [B,V]. top_k = 0 and top_p = 1.0 keep everything; the most likely token is
    always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the probability mass strictly before it is below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _token_logp(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _sequential_decode(
    step_fn: StepFn,
    cache: Cache,
    logits0: jax.Array,
    pick: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    **processing,
) -> tuple[jax.Array, jax.Array]:
    """One token per row per step, chosen by `pick(logits [B,V], step) -> [B]` from the logits
    after `process_scores` (processing: its penalty and grammar options; all off by default).

    Returns tokens int32 [B, max_len] and the model log-probability of each row float32 [B].
    """
    batch = logits0.shape[0]

    def choose(t, logits, tokens, done, logp):
        allowed = process_scores(logits, tokens, t, max_len=max_len, eos_id=eos_id, **processing)
        tok = jnp.where(done, pad_id, pick(allowed, t).astype(jnp.int32))
        logp = logp + jnp.where(done, 0.0, _token_logp(logits, tok))
        return tokens.at[:, t].set(tok), done | (tok == eos_id), logp

    tokens = jnp.full((batch, max_len), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    logp = jnp.zeros((batch,), jnp.float32)
    tokens, done, logp = choose(0, logits0, tokens, done, logp)

    def cond(state):
        t, _, _, done, _ = state
        return (t < max_len) & ~jnp.all(done)

    def body(state):
        t, cache, tokens, done, logp = state
        logits, cache = step_fn(cache, tokens[:, t - 1])
        tokens, done, logp = choose(t, logits, tokens, done, logp)
        return t + 1, cache, tokens, done, logp

    state = (jnp.asarray(1, jnp.int32), cache, tokens, done, logp)
    _, _, tokens, _, logp = jax.lax.while_loop(cond, body, state)
    return tokens, logp


def greedy_decode(step_fn, cache, logits0, *, max_len: int, eos_id: int, pad_id: int, **processing):
    """Argmax at every step. -> tokens int32 [B, max_len], log-probability float32 [B].
    processing: penalties and grammar (`process_scores`)."""
    pick = lambda logits, t: jnp.argmax(logits, axis=-1)
    return _sequential_decode(
        step_fn, cache, logits0, pick, max_len=max_len, eos_id=eos_id, pad_id=pad_id, **processing
    )


def sample_decode(
    step_fn,
    cache,
    logits0,
    rng: jax.Array,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    **processing,
):
    """Ancestral sampling with temperature and top-k / top-p filtering, after the penalties.

    -> tokens int32 [B, max_len], log-probability under the unfiltered model float32 [B].
    """

    def pick(logits, t):
        scaled = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), scaled, axis=-1)

    return _sequential_decode(
        step_fn, cache, logits0, pick, max_len=max_len, eos_id=eos_id, pad_id=pad_id, **processing
    )


def beam_search(
    step_fn,
    cache,
    logits0,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.0,
    early_stopping: bool | str = "never",
    **processing,
):
    """Beam search keeping `num_beams` alive and `num_beams` finished hypotheses per row, as
    transformers' `generate` does.

    Each step scores all K x V extensions (log-probabilities after `process_scores`; processing:
    its penalty and grammar options), takes the best 2K; an EOS extension finishes a hypothesis
    only when it ranks among the best K (so width 1 is exactly greedy), the best K non-EOS
    extensions stay alive. Alive hypotheses finish when they reach `max_len`. A row stops taking
    finished hypotheses once it is done: it holds K and its best alive beam cannot beat the worst
    of them, judged over the longest length ("never" with length_penalty > 0; exact) or over its
    current length (otherwise; exact for "never"), or, with early_stopping True, as soon as it
    holds K. The loop ends when every row is done.

    -> tokens int32 [B, max_len] of the best finished hypothesis and its score float32 [B]
    (`logp / length ** length_penalty`, logp after the penalties).
    """
    batch, vocab = logits0.shape
    k = num_beams
    neg_inf = jnp.float32(-jnp.inf)
    bound_at_max_len = early_stopping == "never" and length_penalty > 0

    def penalised(logp, length):
        return logp / jnp.asarray(length, jnp.float32) ** length_penalty

    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    state = dict(
        t=jnp.asarray(0, jnp.int32),
        cache=cache,
        logits=jnp.repeat(logits0, k, axis=0),
        alive_seq=jnp.full((batch, k, max_len), pad_id, jnp.int32),
        # Only beam 0 is real at the start; the copies must not produce duplicate hypotheses.
        alive_logp=jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None].repeat(batch, 0),
        fin_seq=jnp.full((batch, k, max_len), pad_id, jnp.int32),
        fin_score=jnp.full((batch, k), neg_inf),
        open=jnp.ones((batch,), bool),  # the row still takes finished hypotheses
    )

    def cond(s):
        return (s["t"] < max_len) & jnp.any(s["open"])

    def body(s):
        t = s["t"]
        logp = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)
        history = s["alive_seq"].reshape(batch * k, max_len)
        logp = process_scores(logp, history, t, max_len=max_len, eos_id=eos_id, **processing)
        cand = (s["alive_logp"][:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, -1)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # [B,2K], best first
        parent = top_idx // vocab
        tok = (top_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(s["alive_seq"], parent[:, :, None], axis=1)
        seqs = seqs.at[:, :, t].set(tok)
        is_eos = tok == eos_id

        finishes = (is_eos | (t == max_len - 1)) & (jnp.arange(2 * k) < k) & s["open"][:, None]
        new_fin = jnp.where(finishes, penalised(top_logp, t + 1), neg_inf)
        fin_score, fin_idx = jax.lax.top_k(jnp.concatenate([s["fin_score"], new_fin], 1), k)
        fin_seq = jnp.take_along_axis(
            jnp.concatenate([s["fin_seq"], seqs], 1), fin_idx[:, :, None], axis=1
        )

        alive_logp, alive_idx = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_logp), k)
        alive_seq = jnp.take_along_axis(seqs, alive_idx[:, :, None], axis=1)
        rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(parent, alive_idx, 1)).reshape(
            -1
        )
        cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), s["cache"])

        # Finished scores only fall as the denominator grows (length_penalty > 0) or rise as it
        # shrinks; an alive beam's log-prob only falls.
        full = fin_score[:, -1] > neg_inf
        best_alive = penalised(alive_logp[:, 0], max_len if bound_at_max_len else t + 1)
        still_open = s["open"] & ~(full & (best_alive <= fin_score[:, -1]))
        if early_stopping is True:
            still_open = still_open & ~full

        def advance(cache):
            return step_fn(cache, alive_seq[:, :, t].reshape(-1))

        # The last step needs no further logits; skip the model call there.
        logits, cache = jax.lax.cond(t + 1 < max_len, advance, lambda c: (s["logits"], c), cache)
        return dict(
            t=t + 1,
            cache=cache,
            logits=logits,
            alive_seq=alive_seq,
            alive_logp=alive_logp,
            fin_seq=fin_seq,
            fin_score=fin_score,
            open=still_open,
        )

    s = jax.lax.while_loop(cond, body, state)
    return s["fin_seq"][:, 0], s["fin_score"][:, 0]


def decode(step_fn, cache, logits0, config: DecodeConfig, rng: jax.Array | None = None):
    """Dispatches on `config.strategy`. -> tokens int32 [B, max_new_tokens], scores float32 [B]."""
    common = dict(
        max_len=config.max_new_tokens,
        eos_id=config.eos_id,
        pad_id=config.pad_id,
        loc_offset=config.loc_offset,
        loc_bins=config.loc_bins,
        start_id=config.start_id,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        min_new_tokens=config.min_new_tokens,
    )
    if config.strategy == "greedy":
        return greedy_decode(step_fn, cache, logits0, **common)
    if config.strategy == "beam":
        return beam_search(
            step_fn,
            cache,
            logits0,
            num_beams=config.num_beams,
            length_penalty=config.length_penalty,
            early_stopping=config.early_stopping,
            **common,
        )
    if rng is None:
        raise ValueError("strategy='sample' needs an rng key")
    return sample_decode(
        step_fn,
        cache,
        logits0,
        rng,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        **common,
    )
