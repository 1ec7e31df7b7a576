"""Smoke test of `python -m tools.bench`'s table plumbing on toy figures (no timing thresholds)."""

import importlib
import json

import pytest

bench = importlib.import_module("tools.bench.__main__")


def toy(settings):
    return [bench.Row("toy: ours vs reference", 2.0, 8.0, "things/s", "a note")]


def broken(settings):
    raise ValueError("no such input")


def test_median_seconds_skips_warmup_and_calls_repeats():
    calls = []
    seconds = bench.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5
    assert seconds >= 0.0


def test_run_figures_keeps_going_after_a_failure():
    settings = bench.Settings(repeats=1, torch_ref=None)
    rows = bench.run_figures({"broken": broken, "toy": toy}, settings)
    assert [r.figure for r in rows] == ["broken", "toy: ours vs reference"]
    assert rows[0].ratio is None and rows[0].note == "failed: ValueError: no such input"
    assert rows[1].ratio == pytest.approx(0.25)


def test_table_lines_plain_and_markdown():
    rows = [
        bench.Row("toy: ours vs reference", 1234.5, 2.0, "things/s"),
        bench.Row("x", None, 1.0, ""),
    ]
    plain = bench.table_lines(rows, markdown=False)
    assert plain[0].split()[:5] == ["figure", "ours", "reference", "ratio", "units"]
    assert "1,234" in plain[2] and "617" in plain[2]  # ratio 617.25
    md = bench.table_lines(rows, markdown=True)
    assert md[0] == "| figure | ours | reference | ratio | units | notes |"
    assert md[3] == "| x | - | 1 | - |  |  |"


def test_main_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "FIGURES", {"toy": toy})
    doc = tmp_path / "docs" / "benchmarks.md"
    code = bench.main(
        ["--only", "toy", "--repeats", "1", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    )
    assert code == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert result["rows"] == [
        {
            "figure": "toy: ours vs reference",
            "ours": 2.0,
            "reference": 8.0,
            "units": "things/s",
            "note": "a note",
            "ratio": 0.25,
        }
    ]
    assert {"cpu", "cores", "jax", "jaxlib", "torch", "devices"} <= set(result["machine"])
    text = doc.read_text()
    assert "| toy: ours vs reference | 2 | 8 | 0.25 | things/s | a note |" in text
    assert "## Machine" in text and "median" in text
    assert result["command"].startswith("python -m tools.bench --only toy")
    assert result["command"] in text
    assert "toy: ours vs reference" in capsys.readouterr().out


def test_rewriting_the_doc_keeps_the_input_pipeline_section(tmp_path, monkeypatch):
    """docs/benchmarks.md also holds tools/bench/input_pipeline.py's section: a rerun of the
    table keeps it (and input_pipeline.py --doc replaces only its own section)."""
    from tools.bench import input_pipeline

    monkeypatch.setattr(bench, "FIGURES", {"toy": toy})
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nold table\n")
    doc.write_text(input_pipeline.with_section(doc.read_text(), [input_pipeline.SECTION, "", "v1"]))
    doc.write_text(input_pipeline.with_section(doc.read_text(), [input_pipeline.SECTION, "", "v2"]))
    assert doc.read_text().count(input_pipeline.SECTION) == 1 and "v1" not in doc.read_text()
    args = ["--only", "toy", "--repeats", "1", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    assert bench.main(args) == 0
    text = doc.read_text()
    assert "old table" not in text and "| toy: ours vs reference |" in text
    assert text.endswith(input_pipeline.SECTION + "\n\nv2")


def test_unknown_figure_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench, "FIGURES", {"toy": toy})
    with pytest.raises(SystemExit) as err:
        bench.main(["--only", "nope"])
    assert err.value.code == 2
    assert "unknown figure(s) ['nope']" in capsys.readouterr().err
