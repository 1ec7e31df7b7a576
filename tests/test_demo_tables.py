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
