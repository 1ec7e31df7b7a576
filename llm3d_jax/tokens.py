"""The text side of location tokens: metres in text <-> `<locN>` tokens on a scene's voxel grid.

Language records write locations in metres, grid-independent (docs/architecture.md):
`<box>x0 y0 z0 x1 y1 z1</box>` for an axis-aligned box and `<pt>x y z</pt>` for a point. Before
tokenisation they become location tokens on the scene's 256^3 grid, one token per axis coordinate,
`voxel = clip(floor((p - grid_origin) / grid_voxel), 0, bins - 1)`, the same formula as the
scene feature file's `voxels`, so a location token is exactly a voxel index. A box is 6 tokens
(xmin ymin zmin xmax ymax zmax), a point 3. Decoding maps a voxel index back to metres at the
voxel centre, `grid_origin + (i + 0.5) * grid_voxel`, so a round trip is exact to half a voxel.

Decoding model output (`tokens_to_placeholders`): a run of consecutive location tokens (spaces
between them allowed) of length 6k becomes k boxes, a run of length 3 a point; any other run is
malformed and is DROPPED from the text (it has no meaning in metres, and keeping raw `<locN>`
strings would leak grid indices into answers and metrics).

`python -m llm3d_jax.tokens --records R.jsonl --out DIR [--vocab-size N] [--bins B]` makes the
tokenizer of a random-init model (`train_tokenizer` on the records' prompts and answers, then
`add_location_tokens`): experiments/train.py `--config.tokenizer=DIR`.

`add_location_tokens` gives a HF tokenizer `<loc0>..<loc{B-1}>` as special tokens with ids
`offset + i`, `offset = len(tokenizer)` before adding (docs/architecture.md "Location tokens in
the model"). `train_tokenizer` builds a small T5-like tokenizer (`<pad>`=0, `</s>`=1 appended as
eos, `<unk>`=2) for the tiny model in tests and the demo.
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
from collections.abc import Iterable

import numpy as np

DEFAULT_BINS = 256

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PLACEHOLDER = re.compile(r"<(box|pt)>(.*?)</\1>", re.DOTALL)
_OPEN_OR_CLOSE = re.compile(r"</?(?:box|pt)>")
_LOC = re.compile(r"<loc(\d+)>")
_LOC_RUN = re.compile(r"<loc\d+>(?:\s*<loc\d+>)*")
_WIDTH = {"box": 6, "pt": 3}


def location_token(i: int) -> str:
    """The token string of voxel index `i`: `<loc{i}>`."""
    return f"<loc{int(i)}>"


def location_tokens(bins: int = DEFAULT_BINS) -> list[str]:
    return [location_token(i) for i in range(bins)]


def add_location_tokens(tokenizer, bins: int = DEFAULT_BINS) -> int:
    """Adds `<loc0>..<loc{bins-1}>` as special tokens; returns `offset` with id(`<loc i>`) = offset + i.

    `offset = len(tokenizer)` before adding and the tokenizer grows by exactly `bins`. Idempotent:
    when all the tokens are already present with contiguous ids, returns their offset unchanged.
    A tokenizer holding only some of them, or holding them at scattered ids, is a ValueError.
    """
    vocab = tokenizer.get_vocab()
    tokens = location_tokens(bins)
    if f"<loc{bins}>" in vocab:
        held = bins
        while location_token(held) in vocab:
            held += 1
        raise ValueError(
            f"tokenizer already holds {held} location tokens, more than the {bins} bins asked "
            f"for: make it with --bins {bins} (python -m llm3d_jax.tokens) or pass one without "
            "location tokens (they are added when it is loaded)"
        )
    present = [t for t in tokens if t in vocab]
    if len(present) == bins:
        offset = vocab[tokens[0]]
        if [vocab[t] for t in tokens] != list(range(offset, offset + bins)):
            raise ValueError("tokenizer holds the location tokens at non-contiguous ids")
        return offset
    if present:
        raise ValueError(
            f"tokenizer holds {len(present)} of the {bins} location tokens (e.g. {present[0]}); "
            f"expected none or all: make it with --bins {bins} (python -m llm3d_jax.tokens) or "
            "pass one without location tokens (they are added when it is loaded)"
        )
    offset = len(tokenizer)
    added = tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if added != bins or ids != list(range(offset, offset + bins)):
        raise ValueError(
            f"adding location tokens gave ids {ids[0]}..{ids[-1]} ({added} added), "
            f"expected {offset}..{offset + bins - 1}"
        )
    return offset


def _grid(grid_origin, grid_voxel) -> tuple[np.ndarray, float]:
    origin = np.asarray(grid_origin, np.float64).reshape(3)
    voxel = float(np.asarray(grid_voxel).reshape(()))
    if not np.all(np.isfinite(origin)) or not np.isfinite(voxel) or voxel <= 0:
        raise ValueError(f"bad scene grid: origin {origin.tolist()}, voxel {voxel}")
    return origin, voxel


def metres_to_voxels(values, grid_origin, grid_voxel, bins: int = DEFAULT_BINS) -> np.ndarray:
    """int [..., 3k] voxel indices of coordinates in metres laid out x y z x y z ..."""
    origin, voxel = _grid(grid_origin, grid_voxel)
    v = np.asarray(values, np.float64)
    idx = np.floor((v.reshape(-1, 3) - origin) / voxel)
    return np.clip(idx, 0, bins - 1).astype(np.int64).reshape(v.shape)


def voxels_to_metres(indices, grid_origin, grid_voxel) -> np.ndarray:
    """float32 [..., 3k]: voxel-centre coordinates in metres of voxel indices laid out x y z ..."""
    origin, voxel = _grid(grid_origin, grid_voxel)
    i = np.asarray(indices, np.float64)
    return (origin + (i.reshape(-1, 3) + 0.5) * voxel).astype(np.float32).reshape(i.shape)


def _parse_placeholder(kind: str, body: str) -> np.ndarray:
    """float64 [6] or [3]: the numbers of one placeholder; ValueError naming what is wrong."""
    parts = body.split()
    if any(re.fullmatch(_NUMBER, p) is None for p in parts):
        raise ValueError(f"<{kind}> holds a non-number: <{kind}>{body}</{kind}>")
    values = np.asarray([float(p) for p in parts], np.float64)
    if len(values) != _WIDTH[kind]:
        raise ValueError(
            f"<{kind}> needs {_WIDTH[kind]} numbers, got {len(values)}: <{kind}>{body}</{kind}>"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"<{kind}> holds a non-finite number: <{kind}>{body}</{kind}>")
    if kind == "box" and np.any(values[:3] > values[3:]):
        raise ValueError(f"<box> min exceeds max (order is x0 y0 z0 x1 y1 z1): <box>{body}</box>")
    return values


def _placeholders(text: str) -> list[tuple[re.Match, np.ndarray]]:
    """Every `<box>`/`<pt>` placeholder with its numbers; stray or nested tags are a ValueError."""
    found = [(m, _parse_placeholder(m.group(1), m.group(2))) for m in _PLACEHOLDER.finditer(text)]
    rest = _PLACEHOLDER.sub(" ", text)
    stray = _OPEN_OR_CLOSE.search(rest)
    if stray:
        raise ValueError(f"unmatched {stray.group(0)} in {text!r}")
    for m, _ in found:
        if _OPEN_OR_CLOSE.search(m.group(2)):
            raise ValueError(f"nested location tags in {m.group(0)!r}")
    return found


def placeholders_to_tokens(text: str, grid_origin, grid_voxel, bins: int = DEFAULT_BINS) -> str:
    """Replaces `<box>..</box>` by 6 and `<pt>..</pt>` by 3 location tokens on the scene grid.

    Coordinates outside the grid are clipped to its border voxels. Malformed placeholders (wrong
    count, non-numbers, non-finite, min > max, unmatched tags) raise ValueError with the reason.
    """
    _grid(grid_origin, grid_voxel)
    out, end = [], 0
    for m, values in _placeholders(text):
        idx = metres_to_voxels(values, grid_origin, grid_voxel, bins)
        out += [text[end : m.start()], "".join(location_token(i) for i in idx)]
        end = m.end()
    out.append(text[end:])
    return "".join(out)


def _format_metres(values: np.ndarray) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def tokens_to_placeholders(text: str, grid_origin, grid_voxel) -> str:
    """Turns runs of location tokens back into `<box>`/`<pt>` placeholders in metres (voxel centres).

    A run of 6k tokens is k boxes, a run of 3 is a point, any other run is dropped (module doc).
    Boxes decoded with min > max on an axis keep the model's order; `parse_boxes` then rejects them.
    """
    _grid(grid_origin, grid_voxel)

    def replace(m: re.Match) -> str:
        idx = np.asarray([int(i) for i in _LOC.findall(m.group(0))], np.int64)
        if len(idx) == 3:
            return f"<pt>{_format_metres(voxels_to_metres(idx, grid_origin, grid_voxel))}</pt>"
        if len(idx) % 6 == 0:
            boxes = voxels_to_metres(idx, grid_origin, grid_voxel).reshape(-1, 6)
            return " ".join(f"<box>{_format_metres(b)}</box>" for b in boxes)
        return ""

    return _LOC_RUN.sub(replace, text)


def parse_boxes(text: str) -> np.ndarray:
    """float32 [K,6]: every `<box>` placeholder in order (K may be 0); ValueError when malformed."""
    boxes = [v for m, v in _placeholders(text) if m.group(1) == "box"]
    return np.asarray(boxes, np.float32).reshape(-1, 6)


def parse_points(text: str) -> np.ndarray:
    """float32 [K,3]: every `<pt>` placeholder in order (K may be 0); ValueError when malformed."""
    points = [v for m, v in _placeholders(text) if m.group(1) == "pt"]
    return np.asarray(points, np.float32).reshape(-1, 3)


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Trains a small BPE tokenizer with T5-like specials and saves it in HF format; returns it.

    `<pad>`=0, `</s>`=1 (eos, appended to every encoded sequence), `<unk>`=2; SentencePiece-style
    `▁` word boundaries. The vocabulary holds at most `vocab_size` entries (fewer when the texts
    have fewer merges); printable ASCII is always in it so unseen English words never become
    `<unk>`. `out_dir` gets tokenizer.json, tokenizer_config.json and special_tokens_map.json and
    loads offline with `load_tokenizer(out_dir)`.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.printable) - set(string.whitespace))
    if vocab_size < len(T5_SPECIALS) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} < {len(T5_SPECIALS) + len(alphabet)} (specials + ASCII)"
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(T5_SPECIALS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    # Save into a temp folder beside out_dir, then rename file by file: no half-written tokenizer.
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
        hf.save_pretrained(tmp)
        # transformers v5 folds the special-token map into tokenizer_config.json; older readers
        # and people look for the separate file, so write it too.
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        with open(os.path.join(tmp, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    return hf


# Files of a HF model folder that can point transformers at Python code in it (`auto_map`).
_CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def refuse_remote_code(directory: str | os.PathLike) -> None:
    """InputError when a model folder holds Python code or an `auto_map` naming code to import.

    Model folders come from strangers; transformers would import (or, asked, run) such code.
    Checked before transformers sees the folder, so no prompt is ever shown.
    """
    from llm3d_jax.fileio import InputError

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    code = sorted(n for n in os.listdir(directory) if n.endswith((".py", ".pyc", ".so")))
    if code:
        raise InputError(
            directory,
            f"holds code files ({', '.join(code[:3])}); refusing to load a model folder "
            "with code (this project never runs code from model folders)",
        )
    for name in _CONFIG_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(path, f"unreadable ({type(err).__name__}: {err})") from None
        if isinstance(config, dict) and "auto_map" in config:
            raise InputError(
                path, "has an auto_map (custom code); refusing to load a model folder with code"
            )


def load_tokenizer(directory: str | os.PathLike):
    """A HF tokenizer from a local folder: never remote code, never the network; a folder with
    code (`refuse_remote_code`) or an unreadable tokenizer is an InputError naming the folder."""
    from llm3d_jax.fileio import InputError

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise InputError(directory, "tokenizer directory not found")
    refuse_remote_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            directory, trust_remote_code=False, local_files_only=True
        )
    except Exception as err:  # transformers / tokenizers raise many types for a broken tokenizer
        problem = " ".join(str(err).split())[:200]
        raise InputError(
            directory, f"unreadable tokenizer ({type(err).__name__}: {problem})"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m llm3d_jax.tokens`: the tokenizer for training from random init (module doc)."""
    import argparse

    from llm3d_jax.fileio import InputError

    parser = argparse.ArgumentParser(
        description="Trains a tokenizer on language records (prompts and answers) and adds "
        "the location tokens: the tokenizer of a random-init 3D-LLM (--config.tokenizer)."
    )
    parser.add_argument("--records", required=True, help="language records, JSONL")
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--vocab-size", type=int, default=1000, help="base vocabulary size")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help="location tokens")
    args = parser.parse_args(argv)
    if args.bins < 1:
        raise InputError(None, f"--bins must be >= 1, got {args.bins}")
    if not os.path.isfile(args.records):
        raise InputError(args.records, "file not found")
    texts, bad = [], []
    with open(args.records, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record["prompt"]))
                texts.extend(str(a) for a in record["answers"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                bad.append(f"line {number}: {type(err).__name__}: {err}")
    for problem in bad[:5]:
        print(f"warning: {args.records}: skipped {problem}")
    if not texts:
        raise InputError(args.records, "no record with a prompt and answers")
    # Trained and extended in a temp folder beside --out, then renamed: no half-written tokenizer.
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out), prefix=".tokens.") as tmp:
        try:
            tokenizer = train_tokenizer(texts, args.vocab_size, tmp)
        except ValueError as err:
            raise InputError(None, f"--vocab-size: {err}") from None
        offset = add_location_tokens(tokenizer, args.bins)
        tokenizer.save_pretrained(tmp)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    print(
        f"wrote {args.out}: {offset} base tokens + {args.bins} location tokens "
        f"(<loc0> = {offset}) from {len(texts)} texts; {len(bad)} bad lines skipped"
    )
    return 0


if __name__ == "__main__":
    from llm3d_jax.fileio import cli_main

    cli_main(main)
