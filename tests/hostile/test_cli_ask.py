"""tools/ask.py on hostile and careless input (issue 22 cases 2, 7, 9) and paths as users type
them (issue 18): one line naming the file, non-zero exit, no code from a model folder run."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm3d_jax.datasets import OBJECT_CAPTION_PROMPT
from llm3d_jax.fileio import InputError
from tests.hostile.cli_model import REPO, make_model, make_scene, run_cli
from tools import ask

QUESTION = "where is the brown chair"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    make_model(str(root / "model"))
    make_model(str(root / "model_st"), params_format="safetensors")
    make_scene(str(root / "scene.npz"))
    return root


def _copy(root, name, tmp_path, source="model"):
    out = tmp_path / name
    shutil.copytree(root / source, out)
    return str(out)


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""


# ---------------------------------------------------------------- case 2: code in a model folder

MARKER_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("remote code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_model_folder_with_auto_map_is_refused_before_transformers(root, tmp_path):
    model = _copy(root, "evil", tmp_path)
    with open(os.path.join(model, "evil.py"), "w") as f:
        f.write(MARKER_MODULE)
    _edit_json(
        os.path.join(model, "tokenizer_config.json"),
        lambda c: c.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}),
    )
    proc = run_cli(["tools/ask.py", "--model", model, "--scene", str(root / "scene.npz"), QUESTION])
    _one_line_error(proc, "evil", "code")
    assert not os.path.exists(os.path.join(model, "RAN"))
    # The auto_map alone (no .py beside it) and a .py alone are each refused too.
    os.remove(os.path.join(model, "evil.py"))
    with pytest.raises(InputError, match="auto_map"):
        ask.ask(model, str(root / "scene.npz"), QUESTION)
    shutil.rmtree(model)
    model = _copy(root, "code_only", tmp_path)
    with open(os.path.join(model, "helper.py"), "w") as f:
        f.write("")
    with pytest.raises(InputError, match="helper.py"):
        ask.ask(model, str(root / "scene.npz"), QUESTION)


def test_every_transformers_from_pretrained_is_local_and_trusts_no_code():
    """Every call of a transformers class's `from_pretrained` outside tests says
    trust_remote_code=False and local_files_only=True (our own modules' `from_pretrained` are
    functions, lower case)."""
    import re
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    calls = []
    for name in files:
        if name.startswith("tests/"):
            continue
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"\b[A-Z]\w*\.from_pretrained\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((name, text[m.start() : end]))
    assert any(name == "llm3d_jax/tokens.py" for name, _ in calls)
    bad = [
        (name, call)
        for name, call in calls
        if "trust_remote_code=False" not in call or "local_files_only=True" not in call
    ]
    assert bad == []


# ---------------------------------------------------------------- case 7: silent garbage


@pytest.mark.parametrize(
    "name, replace, message",
    [
        (
            "nan",
            lambda s: dict(
                features=np.where(
                    np.arange(len(s["features"]))[:, None] == 3, np.nan, s["features"]
                ).astype(np.float16)
            ),
            "features hold non-finite values",
        ),
        (
            "inf",
            lambda s: dict(features=np.full_like(s["features"], np.inf)),
            "features hold non-finite values",
        ),
        (
            "neg_voxels",
            lambda s: dict(voxels=s["voxels"].astype(np.int32) - 300),
            r"voxels outside \[0, 255\]",
        ),
        (
            "big_voxels",
            lambda s: dict(voxels=s["voxels"].astype(np.int32) + 300),
            r"voxels outside \[0, 255\]",
        ),
        (
            "float_voxels",
            lambda s: dict(voxels=s["voxels"].astype(np.float32) + 0.5),
            "voxels must be integers",
        ),
        (
            "string_features",
            lambda s: dict(features=s["features"].astype(str)),
            "features must be floating point",
        ),
        ("nan_grid", lambda s: dict(grid_voxel=np.float32(np.nan)), "grid"),
    ],
)
def test_bad_feature_files_are_refused(root, tmp_path, name, replace, message):
    with np.load(root / "scene.npz") as data:
        scene = {k: data[k] for k in data.files}
    path = make_scene(str(tmp_path / f"{name}.npz"), **replace(scene))
    with pytest.raises(InputError, match=message) as err:
        ask.ask(str(root / "model"), path, QUESTION)
    assert err.value.path == path


def _rewrite_params(model, edit):
    path = os.path.join(model, "model.safetensors")
    flat = load_file(path)
    edit(flat)
    save_file(flat, path, metadata={"format": "llm3d_jax.exported"})
    return path


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "float16",
            lambda f: f.update({k: v.astype(np.float16) for k, v in f.items()}),
            "float16, the config says float32",
        ),
        (
            "int32",
            lambda f: f.update({k: v.astype(np.int32) for k, v in f.items()}),
            "int32, the config says float32",
        ),
        (
            "all_nan",
            lambda f: f.update({k: np.full_like(v, np.nan) for k, v in f.items()}),
            "non-finite",
        ),
        ("one_nan", lambda f: f[sorted(f)[0]].reshape(-1).__setitem__(0, np.inf), "non-finite"),
        (
            "wrong_shape",
            lambda f: f.update({sorted(f)[0]: np.zeros((3, 5), np.float32)}),
            "wrong shape",
        ),
    ],
)
def test_bad_exported_params_are_refused(root, tmp_path, name, edit, message):
    model = _copy(root, name, tmp_path, source="model_st")
    path = _rewrite_params(model, edit)
    with pytest.raises(InputError, match=message) as err:
        ask.ask(model, str(root / "scene.npz"), QUESTION)
    assert err.value.path in (model, path)


# ---------------------------------------------------------------- case 9: garbage model files


def test_garbage_tokenizer_json_is_one_line(root, tmp_path):
    model = _copy(root, "garbage_tok", tmp_path)
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {"type": "Nonsense", "vocab": 7}}')
    with pytest.raises(InputError, match="tokenizer") as err:
        ask.ask(model, str(root / "scene.npz"), QUESTION)
    assert err.value.path == model
    with open(os.path.join(model, "tokenizer.json"), "wb") as f:
        f.write(b"\x00\xff not json at all")
    proc = run_cli(["tools/ask.py", "--model", model, "--scene", str(root / "scene.npz"), QUESTION])
    _one_line_error(proc, "tokenizer")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model"]["qformer"].update(num_query_tokens=-4), "num_query_tokens"),
        (lambda c: c["model"]["llm"].update(vocab_size="512"), "vocab_size"),
        (lambda c: c["model"].update(feature_dim=-16), "feature_dim"),
        (lambda c: c["model"]["llm"].update(num_layers=10**9), "num_layers"),
        (lambda c: c["model"].update(posembed_scale="big"), "posembed_scale"),
        (lambda c: c["model"].update(target_threshold=float("nan")), "target_threshold"),
        (lambda c: c["model"]["llm"].update(dtype=7), "dtype"),
        (lambda c: c["model"]["qformer"].update(attention_impl="flash"), "attention_impl"),
        (lambda c: c["inference"].update(prompt_len=-3), "prompt_len"),
        (lambda c: c["inference"].update(answer_len="six"), "answer_len"),
        (lambda c: c["inference"].update(num_points=0), "num_points"),
        (lambda c: c.update(inference=[1, 2]), "inference"),
        (lambda c: c["inference"].update(prompt_templates={"qa": 3}), "prompt_templates"),
    ],
)
def test_absurd_config_values_are_one_line(root, tmp_path, edit, message):
    model = _copy(root, "absurd", tmp_path)
    config = os.path.join(model, "llm3d_config.json")
    _edit_json(config, edit)
    with pytest.raises(InputError, match=message) as err:
        ask.ask(model, str(root / "scene.npz"), QUESTION)
    assert err.value.path == config


# ---------------------------------------------------------------- issue 18: many questions, paths


def test_relative_paths_and_no_pytorch_banner(root):
    proc = run_cli(
        [
            os.path.join(REPO, "tools", "ask.py"),
            "--model",
            "model",
            "--scene",
            "scene.npz",
            QUESTION,
        ],
        cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert "PyTorch" not in proc.stderr and "absolute" not in proc.stderr
    help_proc = run_cli(["tools/ask.py", "--help"])
    assert help_proc.returncode == 0 and "--questions" in help_proc.stdout
    assert "PyTorch" not in help_proc.stderr


def test_batch_ask_equals_single_ask_and_skips_bad_lines(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)  # scene paths relative to the current folder
    other = make_scene(str(root / "other.npz"), seed=5)
    questions = [
        {"id": "a", "scene": "scene.npz", "question": QUESTION},
        {"id": "b", "scene": "other.npz", "question": "what colour is the table", "task": "qa"},
        {
            "id": "c",
            "scene": "scene.npz",
            "question": "where is the white table",
            "task": "grounding",
        },
        {"id": "d", "scene": "missing.npz", "question": QUESTION},
        {"id": "e", "scene": "other.npz"},
        {"id": "f", "scene": "other.npz", "question": "a white table near the wall"},
        {"id": "g", "scene": "scene.npz", "question": "where is the brown chair " * 10},
        {"id": "h", "scene": "other.npz", "question": "where is the chair near the wall"},
        {"id": "i", "scene": "scene.npz", "task": "object_caption"},  # its fixed prompt
    ]
    lines = [json.dumps(q) for q in questions]
    lines.insert(3, "{not json")
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "a.jsonl"
    # 6 good questions in batches of 4: the last batch is padded.
    code = ask.main(
        ["--model", "model", "--questions", str(path), "--out", str(out), "--batch_size", "4"]
    )
    assert code == 1  # some lines were skipped
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == ["a", "b", "c", "f", "h", "i"]
    for row in rows:
        q = next(q for q in questions if q["id"] == row["id"])
        question = q.get("question", OBJECT_CAPTION_PROMPT)
        answer, _ = ask.ask("model", q["scene"], question, q.get("task", "qa"))
        assert row["answer"] == answer.text
        assert row["boxes"] == [[float(v) for v in b] for b in answer.boxes]
        assert all(len(b) == 6 for b in row["boxes"])
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "q.jsonl"]  # no temp file left
    assert other


def test_batch_ask_reports_each_skipped_line_on_stderr(root, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"id": "a", "scene": str(root / "scene.npz"), "question": QUESTION})
        + "\n[1, 2]\n"
        + json.dumps({"id": "b", "scene": str(tmp_path / "nope.npz"), "question": QUESTION})
        + "\n"
    )
    out = tmp_path / "a.jsonl"
    proc = run_cli(
        [
            "tools/ask.py",
            "--model",
            str(root / "model"),
            "--questions",
            str(path),
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 1
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and "q.jsonl:2: not a JSON object" in skipped[0]
    assert "q.jsonl:3" in skipped[1] and "nope.npz: file not found" in skipped[1]
    assert "Traceback" not in proc.stderr
    assert len(out.read_text().splitlines()) == 1
    # An output that cannot be written: one line, nothing computed into a partial file.
    proc = run_cli(
        [
            "tools/ask.py",
            "--model",
            str(root / "model"),
            "--questions",
            str(path),
            "--out",
            str(tmp_path),
        ]
    )
    _one_line_error(proc, "is a directory")


def test_blip2_folder_with_auto_map_or_code_is_refused(tmp_path):
    from llm3d_jax import loading

    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(InputError, match="auto_map"):
        loading.load_llm3d(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.py").write_text("")
    with pytest.raises(InputError, match="code files"):
        loading.load_llm3d(tmp_path)


def test_generation_penalties_reach_the_decoder(root, monkeypatch):
    monkeypatch.chdir(root)
    options = dict(
        strategy="beam",
        length_penalty=1.2,
        early_stopping=False,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
    )
    model = ask.load_model("model", options)
    assert {k: getattr(model.decode, k) for k in options} == options
    # the tiny model is a T5: the penalties count its decoder start token
    assert model.decode.start_id == model.module.config.llm.decoder_start_token_id

    def bigrams(answer):
        return list(zip(answer.token_ids, answer.token_ids[1:]))

    plain, _ = ask.ask("model", "scene.npz", QUESTION)
    assert len(set(bigrams(plain))) < len(bigrams(plain))  # the plain answer repeats itself
    fresh, _ = ask.ask("model", "scene.npz", QUESTION, decode=dict(no_repeat_ngram_size=2))
    assert len(set(bigrams(fresh))) == len(bigrams(fresh)) > 0
    with pytest.raises(InputError, match="repetition_penalty"):
        ask.main(
            ["--model", "model", "--scene", "scene.npz", QUESTION, "--repetition_penalty", "0"]
        )


def test_object_caption_asks_the_release_prompt_with_its_decoding(root, monkeypatch, capsys):
    """--task object_caption: the question defaults to the release's object prompt and decoding
    to its inference.py settings; options on the command line win."""
    monkeypatch.chdir(root)
    base = ["--model", "model", "--scene", "scene.npz", "--task", "object_caption"]
    args = ask.parse_args(base)
    assert args.question == "Describe the 3D scene."
    assert (args.repetition_penalty, args.max_new_tokens, args.strategy) == (1.5, 50, "greedy")
    args = ask.parse_args([*base, "What is it?", "--repetition_penalty", "1.0"])
    assert args.question == "What is it?" and args.repetition_penalty == 1.0
    assert ask.parse_args(base[:4]).repetition_penalty == 1.0  # qa keeps the plain defaults
    make_scene(str(root / "object.npz"), seed=7)  # one object (id 3) in the file
    seen = {}
    load_model = ask.load_model

    def spy(model_dir, decode=None, batch_size=1):
        model = load_model(model_dir, decode, batch_size)
        seen["decode"] = model.decode
        return model

    monkeypatch.setattr(ask, "load_model", spy)
    assert ask.main(["--model", "model", "--scene", "object.npz", "--task", "object_caption"]) == 0
    assert capsys.readouterr().out.strip()
    assert (seen["decode"].repetition_penalty, seen["decode"].max_new_tokens) == (1.5, 50)
    with pytest.raises(InputError, match="--max_new_tokens must be >= 1"):
        ask.main([*base, "--max_new_tokens", "0"])
