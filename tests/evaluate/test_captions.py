"""caption_metrics against hand-computed values and against pycocoevalcap's own scorers.

Every call starts two JVMs (PTB tokenizer, METEOR), so the three corpora below are scored in one
`caption_metrics_by_group` call (module-scoped); each group must come out as if scored alone.
"""

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from llm3d_jax.evaluate import CAPTION_METRIC_NAMES, caption_metrics, caption_metrics_by_group

PREDS = {
    "q1": "The brown chair is next to the table.",
    "q2": "two",
    "q3": "a white cabinet in the corner of the room",
    "q4": "",
    "q5": "It's on the left side, near the window!",
    "q6": "kitchen",
}
REFS = {
    "q1": ["a brown chair next to a table", "the chair is brown"],
    "q2": ["2", "two"],
    "q3": ["white cabinet", "cabinet in the corner", "a tall white cabinet"],
    "q4": ["black tv"],
    "q5": ["on the left side of the window"],
    "q6": ["living room", "kitchen area"],
}


# Two items with disjoint vocabularies, predicted exactly.
IDENTICAL = {"a": "the brown chair is next to the table", "b": "two white cabinets stand here"}


@pytest.fixture(scope="module")
def scores():
    return caption_metrics_by_group(
        {
            "corpus": (PREDS, REFS),
            "pair": ({"a": "Brown, wooden chair."}, {"a": ["brown chair"]}),
            "identical": (IDENTICAL, {k: [v] for k, v in IDENTICAL.items()}),
        }
    )


@pytest.fixture(scope="module")
def corpus_scores(scores):
    return scores["corpus"]


def test_caption_metrics_equals_pycocoevalcap(corpus_scores):
    # The reference pipeline as pycocoevalcap's COCOEvalCap runs it: separate tokenizer calls.
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, _ = Meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    expected = {
        "BLEU-1": bleu[0],
        "BLEU-2": bleu[1],
        "BLEU-3": bleu[2],
        "BLEU-4": bleu[3],
        "METEOR": meteor,
        "ROUGE-L": rouge,
        "CIDEr": cider,
    }
    assert set(corpus_scores) == set(CAPTION_METRIC_NAMES)
    for name, value in expected.items():
        assert corpus_scores[name] == pytest.approx(100 * value, abs=1e-9), name
    # Non-trivial corpus: nothing at an extreme, so a swapped or missing scorer would show.
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        assert 0 < corpus_scores[name] < 100, name
    assert corpus_scores["CIDEr"] > 0
    # EM on raw strings: only q2 ("two") matches literally; refined: q2, q3 (contained), q6.
    assert corpus_scores["EM"] == pytest.approx(100 / 6)
    assert corpus_scores["EM-refined"] == pytest.approx(300 / 6)


def test_caption_metrics_hand_computed_single_pair(scores):
    out = scores["pair"]
    # Tokens "brown wooden chair" vs "brown chair": 2 of 3 unigrams match, no brevity penalty.
    assert out["BLEU-1"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    # LCS 2: P = 2/3, R = 1, F = (1 + 1.2^2) P R / (R + 1.2^2 P).
    p, r, b2 = 2 / 3, 1.0, 1.2**2
    assert out["ROUGE-L"] == pytest.approx(100 * (1 + b2) * p * r / (r + b2 * p))
    assert out["EM"] == 0.0 and out["EM-refined"] == 0.0


def test_caption_metrics_identical_corpus(scores):
    # Two items with disjoint vocabularies: every n-gram has IDF log(2), the TF-IDF vectors are
    # equal, so each n-gram order scores cosine 1 and CIDEr-D = 10 (x100 = 1000).
    out = scores["identical"]
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-4)
    assert out["ROUGE-L"] == pytest.approx(100.0)
    assert out["CIDEr"] == pytest.approx(1000.0)
    assert out["EM"] == 100.0 and out["EM-refined"] == 100.0
    assert 90 < out["METEOR"] <= 100  # METEOR keeps a small fragmentation penalty


def test_caption_metrics_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="no prediction"):
        caption_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})


def test_caption_metrics_without_java_fails_clearly(monkeypatch):
    import llm3d_jax.evaluate.captions as captions

    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="need Java on PATH"):
        caption_metrics({"a": "x"}, {"a": ["x"]})
