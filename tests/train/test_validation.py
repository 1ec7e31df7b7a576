"""Generation metrics of the periodic validation: hand-made batches with known scores, and a short
in-process experiments/train.py run on a small TFDS folder (text EM and grounding Acc@0.25)."""

import importlib.util
import os
import sys

import jax
import numpy as np

from llm3d_jax.train import sharding, validation
from llm3d_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _global(mesh, x):
    """A host array as a global batch (rows over data x fsdp), like the input pipeline's."""
    return jax.device_put(np.asarray(x), sharding.batch_sharding(mesh))


def _counts(mesh, generated, answer_ids, answer_mask):
    batch = {"answer_ids": _global(mesh, answer_ids), "answer_mask": _global(mesh, answer_mask)}
    return validation.batch_counts(_global(mesh, generated), batch, None)


def test_token_exact_match_on_a_hand_made_batch():
    """Rows on different devices of a (2,2,1) mesh, scored on tokens (no tokenizer)."""
    mesh = sharding.make_mesh((2, 2, 1), jax.devices()[:4])
    # One right (EOS = 1 included), one wrong at one position.
    answer_ids = np.array([[5, 6, 1, 0], [5, 6, 7, 1]] * 2, np.int32)
    answer_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]] * 2, bool)
    generated = np.array([[5, 6, 1, 0], [5, 8, 7, 1]] * 2, np.int32)
    counts = _counts(mesh, generated, answer_ids, answer_mask)
    assert counts == {"em_hits": 2, "em_count": 4, "acc25_hits": 0, "acc25_count": 0}
    assert validation.summarize(counts) == {"val_em": 0.5}
    # Batch padding (empty mask) is not counted; tokens past the mask do not matter.
    answer_ids[2:] = [[0, 0, 0, 0], [9, 1, 0, 0]]
    answer_mask[2:] = [[0, 0, 0, 0], [1, 1, 0, 0]]
    generated[2:] = [[3, 3, 3, 3], [9, 1, 4, 4]]
    np.testing.assert_array_equal(
        validation.token_exact_match(generated, answer_ids, answer_mask), [1, 0, 1, 1]
    )
    counts = _counts(mesh, generated, answer_ids, answer_mask)
    assert (counts["em_hits"], counts["em_count"]) == (2, 3)
    total = validation.sum_over_processes([counts, counts])
    assert validation.summarize(total) == {"val_em": 4 / 6}


def test_process_rows_reassembles_the_local_rows_in_order():
    mesh = sharding.make_mesh((2, 2, 2))
    x = np.arange(8 * 3).reshape(8, 3)
    np.testing.assert_array_equal(validation.process_rows(_global(mesh, x)), x)
    replicated = jax.device_put(x, sharding.replicated(mesh))
    np.testing.assert_array_equal(validation.process_rows(replicated), x)


def test_text_exact_match_and_grounding_on_hand_made_rows():
    box = "<box>0.0 0.0 0.0 1.0 1.0 1.0</box>"
    rows = [
        # Normalisation: case, punctuation, articles, numbers; location spans removed.
        dict(task="qa", prediction="The Chair.", boxes=[], answers=["chair", "a stool"]),
        dict(task="qa", prediction="table", boxes=[], answers=["a lamp"]),
        dict(task="qa", prediction=f"2 chairs {box}", boxes=[], answers=["two chairs"]),
        # Location-only references without a grounding task: nothing to score as text.
        dict(task="navigation", prediction="x", boxes=[], answers=["<pt>1.0 2.0 0.0</pt>"]),
        # Grounding: IoU 0.5 (hit), a box far away (miss), no predicted box (miss).
        dict(task="grounding", prediction="", boxes=[[0, 0, 0, 1, 1, 0.5]], answers=[box]),
        dict(task="grounding", prediction="", boxes=[[5, 5, 5, 6, 6, 6]], answers=[box]),
        dict(task="grounding", prediction="", boxes=np.zeros((0, 6)), answers=[box]),
    ]
    counts = validation.score_answers(rows)
    assert counts == {"em_hits": 2, "em_count": 3, "acc25_hits": 1, "acc25_count": 3}
    assert validation.summarize(validation.score_answers(rows[:2])) == {"val_em": 0.5}
    assert validation.summarize(validation.score_answers(rows[4:6])) == {"val_acc25": 0.5}


def test_train_run_logs_text_em_and_grounding_acc(tmp_path):
    """experiments/train.py on a TFDS fixture (qa, caption and grounding records) with
    `eval_generate_batches`: the answers are decoded with the run's tokenizer."""
    from data_pipeline.tfds import build
    from experiments.train import train
    from llm3d_jax import tokens

    sys.path.insert(0, os.path.join(REPO, "tests", "data_pipeline"))
    from test_tfds_fixtures import write_fixture

    features_dir, records, _, rows = write_fixture(
        str(tmp_path), num_scenes=4, records_per_scene=3, dim=64
    )
    build(features_dir, records, str(tmp_path / "tfds"), "synthetic", val_fraction=0.5, seed=0)
    tok_dir = str(tmp_path / "tok")
    tokens.train_tokenizer([r["prompt"] + " " + " ".join(r["answers"]) for r in rows], 300, tok_dir)

    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(REPO, "experiments", "configs", "demo.py")
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.update(
        dict(
            tokenizer=tok_dir,
            data_dir=str(tmp_path / "tfds"),
            total_steps=2,
            eval_every=2,
            eval_steps=1,
            log_every=1,
        )
    )
    config.eval_generate_batches = 1
    config.model.preset = "tiny"
    config.data.update(dict(num_points=24, prompt_len=40, answer_len=12))
    workdir = str(tmp_path / "run")
    assert train(config, workdir) == 0
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    val = rows[-1]
    assert 0.0 <= val["val_em"] <= 1.0 and 0.0 <= val["val_acc25"] <= 1.0
    assert np.isfinite(val["val_loss"]) and "val_em" not in rows[0]
