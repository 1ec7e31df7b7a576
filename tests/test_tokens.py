"""Location tokens: placeholders <-> tokens through a scene grid, tokenizer growth, tiny tokenizer."""

import json
import os

import numpy as np
import pytest

from llm3d_jax import tokens

ORIGIN = np.array([-1.0, -2.0, 0.0], np.float32)
VOXEL = np.float32(0.02)  # a 5.12 m cube


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = [
        "what is on the table? a red cup",
        "the chair is near the window <box>0.1 0.2 0.3 1.0 1.1 1.2</box>",
        "how many chairs are there? three",
    ] * 10
    tokens.train_tokenizer(texts, vocab_size=300, out_dir=out)
    return str(out)


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_location_token_names():
    assert tokens.location_token(0) == "<loc0>"
    assert tokens.location_token(255) == "<loc255>"
    assert tokens.location_tokens(3) == ["<loc0>", "<loc1>", "<loc2>"]


def test_box_round_trip_within_half_a_voxel():
    rng = np.random.default_rng(0)
    extent = 256 * float(VOXEL)
    for _ in range(50):
        lo = ORIGIN + rng.uniform(0, extent / 2, 3)
        hi = lo + rng.uniform(0, extent / 2 - 1e-3, 3)
        box = np.concatenate([lo, hi])
        text = "the box is " + "<box>" + " ".join(f"{v:.4f}" for v in box) + "</box>."
        toks = tokens.placeholders_to_tokens(text, ORIGIN, VOXEL)
        assert toks.startswith("the box is <loc") and toks.endswith(">.")
        assert len(tokens._LOC.findall(toks)) == 6
        back = tokens.tokens_to_placeholders(toks, ORIGIN, VOXEL)
        got = tokens.parse_boxes(back)
        assert got.shape == (1, 6)
        np.testing.assert_array_less(np.abs(got[0] - np.round(box, 4)), VOXEL / 2 + 1e-3)


def test_voxel_formula_matches_feature_file_voxels():
    # Same formula as the scene feature file: clip(floor((p - origin) / voxel), 0, bins - 1).
    pts = np.array([[-1.0, -2.0, 0.0], [-0.99, -1.97, 0.05], [10.0, -5.0, 5.119]])
    want = np.clip(np.floor((pts - ORIGIN) / VOXEL), 0, 255).astype(int)
    text = " ".join("<pt>" + " ".join(f"{v}" for v in p) + "</pt>" for p in pts)
    toks = tokens.placeholders_to_tokens(text, ORIGIN, VOXEL)
    got = np.array([int(i) for i in tokens._LOC.findall(toks)]).reshape(-1, 3)
    np.testing.assert_array_equal(got, want)
    assert got[2].tolist() == [255, 0, 255]  # clipped at the grid border


def test_point_and_custom_bins():
    toks = tokens.placeholders_to_tokens(
        "go to <pt>0.5 0.5 0.5</pt> now", [0, 0, 0], 1 / 64, bins=64
    )
    assert toks == "go to <loc32><loc32><loc32> now"
    back = tokens.tokens_to_placeholders(toks, [0, 0, 0], 1 / 64)
    np.testing.assert_allclose(tokens.parse_points(back), [[0.5078125] * 3], atol=1e-3)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<box>1 2 3 4 5</box>", "needs 6 numbers"),
        ("<pt>1 2</pt>", "needs 3 numbers"),
        ("<pt>1 two 3</pt>", "non-number"),
        ("<pt>1 nan 3</pt>", "non-number"),
        ("<pt>1 1e999 3</pt>", "non-finite"),
        ("<box>1 1 1 0 2 2</box>", "min exceeds max"),
        ("a <box>1 2 3 4 5 6", "unmatched <box>"),
        ("a 1 2 3</pt>", "unmatched </pt>"),
        ("<box>0 0 0 <pt>1 1 1</pt> 2 2 2</box>", "box"),
    ],
)
def test_malformed_placeholders_raise_with_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        tokens.placeholders_to_tokens(text, ORIGIN, VOXEL)


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="bad scene grid"):
        tokens.placeholders_to_tokens("<pt>0 0 0</pt>", ORIGIN, 0.0)


def test_tokens_to_placeholders_runs():
    o, v = np.zeros(3), 1.0
    two_boxes = "".join(f"<loc{i}>" for i in [0, 1, 2, 3, 4, 5, 1, 1, 1, 2, 2, 2])
    out = tokens.tokens_to_placeholders(f"both {two_boxes} here", o, v)
    np.testing.assert_allclose(
        tokens.parse_boxes(out), [[0.5, 1.5, 2.5, 3.5, 4.5, 5.5], [1.5, 1.5, 1.5, 2.5, 2.5, 2.5]]
    )
    # Decoded text may carry spaces between special tokens: still one run.
    assert tokens.tokens_to_placeholders("at <loc1> <loc2>  <loc3>!", o, v) == (
        "at <pt>1.500 2.500 3.500</pt>!"
    )
    # Malformed runs (length not 3 or 6k) are dropped; the rest of the text stays.
    assert tokens.tokens_to_placeholders("a <loc1><loc2> b <loc1><loc2><loc3><loc4> c", o, v) == (
        "a  b  c"
    )
    assert tokens.tokens_to_placeholders("no tokens", o, v) == "no tokens"


def test_parse_empty_and_mixed():
    assert tokens.parse_boxes("nothing").shape == (0, 6)
    assert tokens.parse_points("nothing").shape == (0, 3)
    text = "<pt>1 2 3</pt> and <box>0 0 0 1 1 1</box> and <pt>-1 -2.5 .5</pt>"
    np.testing.assert_allclose(tokens.parse_points(text), [[1, 2, 3], [-1, -2.5, 0.5]])
    np.testing.assert_allclose(tokens.parse_boxes(text), [[0, 0, 0, 1, 1, 1]])


def test_train_tokenizer_files_and_specials(tiny_tokenizer):
    names = set(os.listdir(tiny_tokenizer))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # temp folder renamed away
    with open(os.path.join(tiny_tokenizer, "special_tokens_map.json")) as f:
        assert json.load(f)["eos_token"] == "</s>"
    tok = _load(tiny_tokenizer)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= 300
    ids = tok("a red cup near the zebra").input_ids
    assert ids[-1] == 1 and 2 not in ids  # eos appended; unseen ASCII words are not <unk>
    assert tok.decode(ids, skip_special_tokens=True) == "a red cup near the zebra"


def test_add_location_tokens_ids_and_idempotent(tiny_tokenizer):
    tok = _load(tiny_tokenizer)
    before = len(tok)
    offset = tokens.add_location_tokens(tok, bins=16)
    assert offset == before and len(tok) == before + 16
    assert tok.convert_tokens_to_ids(tokens.location_tokens(16)) == list(range(offset, offset + 16))
    assert tokens.add_location_tokens(tok, bins=16) == offset and len(tok) == before + 16
    # The errors say what to do: make the tokenizer with the model's bin count, or without any.
    with pytest.raises(ValueError, match="holds 16 location tokens, more than the 8 .*--bins 8"):
        tokens.add_location_tokens(tok, bins=8)
    with pytest.raises(ValueError, match="16 of the 32 .*--bins 32 .* without location tokens"):
        tokens.add_location_tokens(tok, bins=32)
    # Location tokens come out as single ids, also when glued to words.
    text = tokens.placeholders_to_tokens(
        "cup at <pt>0.11 0.21 0.31</pt>.", [0, 0, 0], 0.05, bins=16
    )
    ids = tok(text).input_ids
    loc = [i - offset for i in ids if i >= offset]
    assert loc == [2, 4, 6]
    decoded = tok.decode(ids, skip_special_tokens=False)
    back = tokens.tokens_to_placeholders(decoded, [0, 0, 0], 0.05)
    np.testing.assert_allclose(tokens.parse_points(back), [[0.125, 0.225, 0.325]], atol=1e-3)


def _records(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_command_makes_the_tokenizer_of_a_random_init_model(tmp_path, capsys):
    rows = [
        {"prompt": f"what is on table {i}?", "answers": ["a red cup", "<box>0 0 0 1 1 1</box>"]}
        for i in range(20)
    ]
    _records(tmp_path / "r.jsonl", rows + ["{not json"])
    code = tokens.main(
        ["--records", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "tok"),
         "--vocab-size", "200", "--bins", "16"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped line 21" in out and "+ 16 location tokens" in out
    tok = _load(tmp_path / "tok")
    offset = tok.convert_tokens_to_ids("<loc0>")
    assert offset <= 200 and len(tok) == offset + 16
    assert tokens.add_location_tokens(tok, 16) == offset  # what training does on load
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "tok"]  # no temp folder left behind


def test_command_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from llm3d_jax.fileio import cli_main

    _records(tmp_path / "empty.jsonl", ["{}"])
    for args, problem in [
        (["--records", str(tmp_path / "missing.jsonl")], "file not found"),
        (["--records", str(tmp_path / "empty.jsonl")], "no record with a prompt and answers"),
        (["--records", str(tmp_path / "empty.jsonl"), "--bins", "0"], "--bins must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(lambda a=args: tokens.main([*a, "--out", str(tmp_path / "tok")]))
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err
    assert not os.path.exists(tmp_path / "tok")
