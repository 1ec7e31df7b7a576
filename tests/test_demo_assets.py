"""The committed pieces `make demo` starts from (assets/demo, built by tools/pretrain_demo.py)."""

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
    # One model, two trainings: the same shapes, the same tokenizer, different weights.
    assert module.config == blind_module.config
    assert tokenizer.get_vocab() == blind_tokenizer.get_vocab()
    flat = exported._flat(params)
    blind_flat = exported._flat(blind_params)
    assert flat.keys() == blind_flat.keys()
    assert any(not np.array_equal(flat[k], blind_flat[k]) for k in flat)
    # The encoder's features are what the model reads; the queries start from points.
    assert module.config.feature_dim == encoder.config.hidden_size
    assert module.config.qformer.seeded_queries
    assert module.config == llm3d.LLM3DConfig.demo(vocab_size=module.config.llm.vocab_size)
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


def test_attribute_records_keep_only_attribute_questions(tmp_path):
    records = tmp_path / "language.jsonl"
    rows = [
        {"id": "a", "task": "qa", "meta": {"qtype": "color"}},
        {"id": "b", "task": "qa", "meta": {"qtype": "between"}},
        {"id": "c", "task": "dense_caption", "meta": {}},
        {"id": "d", "task": "qa", "meta": {"qtype": "exist"}},
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "attributes.jsonl"
    assert pretrain_demo.attribute_records(str(records), str(out)) == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "d"]
    records.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="no QA records"):
        pretrain_demo.attribute_records(str(records), str(tmp_path / "none.jsonl"))
    assert not (tmp_path / "none.jsonl").exists()


def test_attribute_question_types_are_ones_the_language_generator_writes():
    from data_pipeline.language import offline
    from data_pipeline.scenes.synthetic import make_scene

    qtypes = set()
    for index in range(4):
        for record in offline.generate(make_scene(1000, index), seed=1000, tasks=("qa",)):
            qtypes.add(record["meta"]["qtype"])
    assert set(pretrain_demo.ATTRIBUTE_QUESTIONS) <= qtypes, qtypes
    assert qtypes - set(pretrain_demo.ATTRIBUTE_QUESTIONS)  # and not all of them


def test_pretrain_demo_runs_end_to_end_at_toy_size(tmp_path):
    """The script that built assets/demo, at toy size: encoder, data, both models, all three
    phases (the optional grounding phase (c) included)."""
    out = tmp_path / "assets"
    argv = ["--out", str(out), "--scenes", "8", "--encoder-scenes", "2", "--encoder-steps", "2"]
    steps = ["--steps", "2", "--attribute-steps", "2", "--grounding-steps", "2"]
    assert pretrain_demo.main(argv + steps) == 0
    encoder, _ = features.load_encoder(f"vit:{out / 'encoder'}")
    work = out / "work"
    with open(work / "attributes.jsonl") as f:
        qtypes = {json.loads(line)["meta"]["qtype"] for line in f}
    assert qtypes and qtypes <= set(pretrain_demo.ATTRIBUTE_QUESTIONS)
    configs = {}
    for mode in ("3d", "blind"):
        module, _, tokenizer, description = loading.load_exported_bundle(out / f"pretrained_{mode}")
        configs[mode] = module.config
        assert tokenizer is not None and module.config.feature_dim == encoder.config.hidden_size
        # Phase (c) starts from phase (b)'s export and ends at its own last step.
        assert description["source"]["step"] == 2
        assert description["source"]["run"].endswith(f"run_{mode}_grounding")
        for run in (f"run_{mode}", f"run_{mode}_attributes", f"run_{mode}_grounding"):
            assert (work / run / "eval" / "metrics.json").exists()
    assert configs["3d"] == configs["blind"] and configs["3d"].qformer.seeded_queries
    assert configs["3d"].target_tokens and configs["3d"].llm.loc_table_dim
    with open(work / "run_blind_attributes" / "config.json") as f:
        assert json.load(f)["data"]["blind"] is True
