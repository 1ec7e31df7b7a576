"""The demo's final tables read each run's eval files; QA is broken down by question type."""

import json

from tools import demo


def write_run(root, name, predictions):
    workdir = root / name
    (workdir / "eval").mkdir(parents=True)
    with open(workdir / "eval" / "predictions.jsonl", "w") as f:
        for row in predictions:
            f.write(json.dumps(row) + "\n")
    return str(workdir)


def test_qa_by_type_scores_each_question_type_per_run(tmp_path):
    records = tmp_path / "language.jsonl"
    rows = [
        {"id": "a", "task": "qa", "meta": {"qtype": "exist"}},
        {"id": "b", "task": "qa", "meta": {"qtype": "exist"}},
        {"id": "c", "task": "qa", "meta": {"qtype": "floor_color"}},
        {"id": "d", "task": "caption", "meta": {}},
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def preds(answers):
        return [
            {"id": key, "task": "qa", "prediction": p, "answers": [a]}
            for key, (p, a) in answers.items()
        ] + [{"id": "d", "task": "caption", "prediction": "x", "answers": ["y"]}]

    runs = {
        "3D-LLM": write_run(
            tmp_path, "r3d", preds({"a": ("yes", "yes"), "b": ("no", "no"), "c": ("gray", "gray")})
        ),
        "blind": write_run(
            tmp_path, "rb", preds({"a": ("no", "yes"), "b": ("no", "no"), "c": ("beige", "gray")})
        ),
    }
    lines = demo.qa_by_type(runs, str(records)).splitlines()
    assert lines[0] == "| QA question type | n | 3D-LLM | blind |"
    assert lines[2:] == ["| exist | 2 | 100.0 | 50.0 |", "| floor_color | 1 | 100.0 | 0.0 |"]


def test_loss_curves_png_from_each_runs_metrics(tmp_path):
    runs = {}
    for name, scale in (("3d", 1.0), ("blind", 1.2)):
        workdir = tmp_path / name
        workdir.mkdir()
        rows = [{"step": s, "loss": scale * (2.0 - s / 400)} for s in range(10, 410, 10)]
        rows += [{"step": 200, "val_loss": scale}, {"step": 400, "val_loss": scale * 0.9}]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = str(workdir)
    demo.plot_losses(runs, str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grounding_table_against_the_category_prior(tmp_path):
    """Grounding rows of each run next to the mean training box of the named category, and the
    relational QA types as one group."""
    import numpy as np

    features = tmp_path / "features"
    features.mkdir()
    for scene in ("s0", "s1"):
        np.savez(
            features / f"{scene}.npz",
            object_ids=np.array([1, 2], np.int32),
            object_labels=np.array(["chair", "lamp"]),
        )
    box = lambda *v: "<box>" + " ".join(f"{x:.3f}" for x in v) + "</box>"  # noqa: E731
    records = tmp_path / "language.jsonl"
    rows = [
        # training chairs at x 0..1 and 2..3: the prior chair box is 1..2
        dict(
            id="t1",
            scene_id="s0",
            task="grounding",
            object_ids=[1],
            answers=[box(0, 0, 0, 1, 1, 1)],
            meta={"split": "train"},
        ),
        dict(
            id="t2",
            scene_id="s1",
            task="grounding",
            object_ids=[1],
            answers=[box(2, 0, 0, 3, 1, 1)],
            meta={"split": "train"},
        ),
        dict(
            id="v1",
            scene_id="s0",
            task="grounding",
            object_ids=[1],
            answers=[box(1, 0, 0, 2, 1, 1)],
            meta={"split": "val"},
        ),
        dict(
            id="v2",
            scene_id="s0",
            task="grounding",
            object_ids=[1],
            answers=[box(5, 5, 0, 6, 6, 1)],
            meta={"split": "val"},
        ),
        dict(id="q1", scene_id="s0", task="qa", answers=["yes"], meta={"qtype": "on_yn"}),
        dict(id="q2", scene_id="s0", task="qa", answers=["red"], meta={"qtype": "color"}),
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prior = demo.category_prior_boxes(str(records), str(features))
    np.testing.assert_allclose(prior["v1"], [1, 0, 0, 2, 1, 1])

    def preds(v1_box, q1):
        return [
            dict(
                id="v1",
                scene_id="s0",
                task="grounding",
                answers=rows[2]["answers"],
                boxes=[v1_box] if v1_box else [],
                prediction="",
            ),
            dict(
                id="v2",
                scene_id="s0",
                task="grounding",
                answers=rows[3]["answers"],
                boxes=[],
                prediction="",
            ),
            dict(id="q1", task="qa", answers=["yes"], prediction=q1),
            dict(id="q2", task="qa", answers=["red"], prediction="red"),
        ]

    runs = {
        "3D-LLM": write_run(tmp_path, "r3d", preds([1, 0, 0, 2, 1, 1], "yes")),
        "blind": write_run(tmp_path, "rb", preds(None, "no")),
    }
    lines = demo.grounding_table(runs, str(records), str(features)).splitlines()
    assert lines[0] == "| held-out grounding (2 questions) | 3D-LLM | blind | category prior |"
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert [c.strip(" |") for c in cells["Acc@0.25"]] == ["50.0", "0.0", "50.0"]
    assert [c.strip(" |") for c in cells["answers without a box (%)"]] == ["50.0", "100.0", "-"]
    assert [c.strip(" |") for c in cells["relational QA EM"]] == ["100.0", "0.0", "-"]
    assert [c.strip(" |") for c in cells["attribute QA EM"]] == ["100.0", "100.0", "-"]
    # boxes.png: the right and the wrong answer of one room
    right, wrong = demo.right_and_wrong(f"{runs['3D-LLM']}/eval/predictions.jsonl")
    assert (right["id"], wrong["id"]) == ("v1", "v2")
