"""The committed pieces `make demo` starts from (assets/demo, built by tools/pretrain_demo.py)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from data_pipeline import features
from llm3d_jax import loading
from llm3d_jax.infer import exported
from llm3d_jax.model import llm3d
from tools import demo, pretrain_demo


def test_demo_encoder_and_both_pretrained_models_load_and_fit_together():
    encoder, _ = features.load_encoder(demo.ENCODER)
    bundles = {mode: loading.load_exported_bundle(path) for mode, path in demo.PRETRAINED.items()}
    (module, params, tokenizer, _), (blind_module, blind_params, blind_tokenizer, _) = (
        bundles["3d"],
        bundles["blind"],
    )
    # One model, two trainings: the same shapes, the same tokenizer, different weights; only the
    # 3D model has object roles (rated points of zero features give the blind model no boxes).
    assert module.config == dataclasses.replace(blind_module.config, object_roles=3)
    assert tokenizer.get_vocab() == blind_tokenizer.get_vocab()
    flat = exported._flat(params)
    blind_flat = exported._flat(blind_params)
    roles = {k for k in flat if k.startswith(("relevance/role_", "role_geometry/"))}
    assert roles and flat.keys() - roles == blind_flat.keys()
    assert any(not np.array_equal(flat[k], blind_flat[k]) for k in flat)
    # The encoder's features are what the model reads; the queries start from points.
    assert module.config.feature_dim == encoder.config.hidden_size
    assert module.config.qformer.seeded_queries
    # the demo preset grown by phase (c)'s grounding settings
    grounding = {
        flag.split("=")[0].rsplit(".", 1)[1]: int(flag.split("=")[1])
        for flag in pretrain_demo.GROUNDING_SETTINGS + pretrain_demo.ROLE_SETTINGS
    }
    preset = llm3d.LLM3DConfig.demo(vocab_size=module.config.llm.vocab_size)
    assert module.config == llm3d.with_overrides(preset, **grounding)
    assert "<loc0>" in tokenizer.get_vocab()
    # The encoder report says it was trained on rooms of another seed than the demo's.
    with open(os.path.join(demo.ENCODER.removeprefix("vit:"), "report.json")) as f:
        report = json.load(f)
    assert report["seed"] != 0 and report["held_out"]["category"] > 50


def test_pretrained_model_answers_from_its_points():
    """Two scenes, one question: the 3D model's answer logits differ between the scenes and
    follow each scene when the batch is reordered."""
    module, params = loading.load_llm3d(demo.PRETRAINED["3d"])
    rng = np.random.default_rng(0)
    inputs = llm3d.example_inputs(module.config, batch=2, points=64)
    inputs["features"] = rng.normal(size=inputs["features"].shape).astype(np.float32)
    inputs["voxels"] = rng.integers(0, 256, size=inputs["voxels"].shape).astype(np.int32)
    logits = np.asarray(module.apply({"params": params}, **inputs))
    assert np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[1], atol=1e-3)
    swapped = dict(inputs, features=inputs["features"][::-1], voxels=inputs["voxels"][::-1])
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, **swapped)), logits[::-1], atol=1e-4
    )


def test_qa_records_keep_only_the_question_types_asked_for(tmp_path):
    records = tmp_path / "language.jsonl"
    rows = [
        {"id": "a", "task": "qa", "meta": {"qtype": "color"}},
        {"id": "b", "task": "qa", "meta": {"qtype": "between"}},
        {"id": "c", "task": "dense_caption", "meta": {}},
        {"id": "d", "task": "qa", "meta": {"qtype": "exist"}},
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "attributes.jsonl"
    attributes = demo.ATTRIBUTE_QUESTIONS
    assert pretrain_demo.qa_records(str(records), str(out), attributes) == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "d"]
    assert pretrain_demo.qa_records(str(records), str(out), demo.RELATIONAL) == 1
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["b"]
    records.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="no QA records"):
        pretrain_demo.qa_records(str(records), str(tmp_path / "none.jsonl"), attributes)
    assert not (tmp_path / "none.jsonl").exists()


def test_attribute_question_types_are_ones_the_language_generator_writes():
    from data_pipeline.language import offline
    from data_pipeline.scenes.synthetic import make_scene

    qtypes = set()
    for index in range(4):
        for record in offline.generate(make_scene(1000, index), seed=1000, tasks=("qa",)):
            qtypes.add(record["meta"]["qtype"])
    assert set(demo.ATTRIBUTE_QUESTIONS) <= qtypes, qtypes
    assert qtypes - set(demo.ATTRIBUTE_QUESTIONS)  # and not all of them


def test_pretrain_demo_runs_end_to_end_at_toy_size(tmp_path):
    """The script that built assets/demo, at toy size: encoder, data, and the 3D model through
    all four phases (the optional phases (c) and (d) included). The blind model runs the same
    commands with the blind flag (next test); at toy size it would double this test's minutes."""
    out = tmp_path / "assets"
    argv = ["--out", str(out), "--scenes", "8", "--encoder-scenes", "2", "--encoder-steps", "2"]
    steps = ["--steps", "2", "--attribute-steps", "2", "--grounding-steps", "2"]
    steps += ["--relation-steps", "2", "--modes", "3d"]
    assert pretrain_demo.main(argv + steps) == 0
    encoder, _ = features.load_encoder(f"vit:{out / 'encoder'}")
    work = out / "work"
    with open(work / "attributes.jsonl") as f:
        qtypes = {json.loads(line)["meta"]["qtype"] for line in f}
    assert qtypes and qtypes <= set(demo.ATTRIBUTE_QUESTIONS)
    with open(work / "relations_attributes.jsonl") as f:  # phase (d): both kinds
        qtypes = {json.loads(line)["meta"]["qtype"] for line in f}
    assert qtypes & set(demo.RELATIONAL) and qtypes & set(demo.ATTRIBUTE_QUESTIONS)
    assert qtypes <= set(demo.RELATIONAL) | set(demo.ATTRIBUTE_QUESTIONS)
    module, _, tokenizer, description = loading.load_exported_bundle(out / "pretrained_3d")
    assert tokenizer is not None and module.config.feature_dim == encoder.config.hidden_size
    # Each phase starts from the one before's export; the model is phase (d)'s last step.
    assert description["source"]["step"] == 2
    assert description["source"]["run"].endswith("run_3d_relations")
    for run in ("run_3d", "run_3d_attributes", "run_3d_grounding", "run_3d_relations"):
        assert (work / run / "eval" / "metrics.json").exists()
    assert module.config.qformer.seeded_queries
    assert module.config.target_tokens and module.config.llm.loc_table_dim
    assert not (out / "pretrained_blind").exists() and not (work / "run_blind").exists()
    with open(work / "run_3d_attributes" / "config.json") as f:
        assert json.load(f)["data"]["blind"] is False


def test_pretrain_demo_runs_each_mode_through_the_same_phases(tmp_path, monkeypatch):
    """Both modes, every phase in order, the blind flag on the blind model's runs only, each
    phase starting from the one before; the commands themselves run in the toy-size test."""
    calls = []
    data = {"records": "R", "tfds": "T", "features": "F"}
    monkeypatch.setattr(pretrain_demo.train_encoder, "main", lambda argv: calls.append("encoder"))
    monkeypatch.setattr(pretrain_demo.demo, "build_data", lambda *a, **k: dict(data))
    monkeypatch.setattr(pretrain_demo.demo, "build_tfds", lambda *a: None)
    monkeypatch.setattr(pretrain_demo, "qa_records", lambda records, out, qtypes: 1)
    monkeypatch.setattr(pretrain_demo.shutil, "copytree", lambda a, b: calls.append(("copy", a, b)))

    def train_and_eval(run, data, seed, blind, steps, pretrained="", extra=()):
        calls.append(("train", os.path.basename(run), blind, steps, pretrained, extra))

    monkeypatch.setattr(pretrain_demo.demo, "train_and_eval", train_and_eval)
    monkeypatch.setattr(
        pretrain_demo, "export", lambda run, target: calls.append(("export", target))
    )
    out = tmp_path / "o"
    argv = ["--out", str(out), "--steps", "3", "--attribute-steps", "4", "--grounding-steps", "5"]
    argv += ["--relation-steps", "6"]
    assert pretrain_demo.main(argv) == 0
    trains = [c[1:4] for c in calls if c[0] == "train"]
    assert trains == [
        (f"run_{mode}{phase}", mode == "blind", steps)
        for mode in ("3d", "blind")
        for phase, steps in (("", 3), ("_attributes", 4), ("_grounding", 5), ("_relations", 6))
    ]
    work = str(out / "work")
    starts = [c[4] for c in calls if c[0] == "train"]
    assert starts == [
        s
        for m in ("3d", "blind")
        for s in ("", f"{work}/mixture_{m}", f"{work}/attributes_{m}", f"{work}/grounding_{m}")
    ]
    grounding = [c[5] for c in calls if c[0] == "train" and c[1].endswith("_grounding")]
    assert all(set(pretrain_demo.GROUNDING_SETTINGS) <= set(extra) for extra in grounding)
    # object roles for the 3D model only, and in phase (d) its fresh role geometry and teacher
    assert [set(pretrain_demo.ROLE_SETTINGS) <= set(extra) for extra in grounding] == [True, False]
    relations = [c[5] for c in calls if c[0] == "train" and c[1].endswith("_relations")]
    assert [set(pretrain_demo.RELATION_SETTINGS) <= set(e) for e in relations] == [True, False]
    # both models at the same rate in each phase
    for phase in (grounding, relations):
        assert len({tuple(a for a in e if a.startswith("--config.optim.lr")) for e in phase}) == 1
    assert [c[2] for c in calls if c[0] == "copy"] == [
        str(out / "pretrained_3d"),
        str(out / "pretrained_blind"),
    ]
    # from pretrained models, phase (d) alone: no phase (c), each model from its own
    calls.clear()
    start = tmp_path / "start"
    argv = ["--out", str(out), "--from-pretrained", str(start), "--grounding-steps", "0"]
    assert pretrain_demo.main(argv + ["--relation-steps", "6"]) == 0
    assert [c[1:5] for c in calls if c[0] == "train"] == [
        (f"run_{m}_relations", m == "blind", 6, str(start / f"pretrained_{m}"))
        for m in ("3d", "blind")
    ]
    with pytest.raises(SystemExit, match="--modes"):
        pretrain_demo.main(["--out", str(out), "--modes", "3d,other"])
