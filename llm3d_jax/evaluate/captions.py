"""Caption / QA text metrics with the standard `pycocoevalcap` scorers (ScanQA conventions).

Predictions and references are PTB-tokenised together in one Java call (lowercased,
punctuation removed), then scored with BLEU-1..4 (corpus level, "closest" reference length),
METEOR 1.5 (one JVM for the whole corpus), ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, IDF from the
evaluated references). EM and refined EM are computed on the raw strings (see `answers`).
All scores x100, the way papers report them.
"""

from __future__ import annotations

import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from llm3d_jax.evaluate.answers import answer_metrics, check_ids

CAPTION_METRIC_NAMES = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr",
    "EM",
    "EM-refined",
)


def require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer and METEOR 1.5 are "
            "Java programs); install a JRE, e.g. `apt-get install default-jre-headless` (make setup)"
        )


def ptb_tokenize(
    preds: dict[str, str], refs: dict[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """PTB-tokenises predictions and references in a single Java call.

    Returns (res, gts) in pycocoevalcap's layout: id -> [tokenised prediction] and
    id -> [tokenised references].
    """
    require_java()
    batch = {("pred", k): [{"caption": v}] for k, v in preds.items()}
    batch.update({("ref", k): [{"caption": r} for r in v] for k, v in refs.items()})
    tokens = PTBTokenizer().tokenize(batch)
    res = {k: tokens[("pred", k)] for k in preds}
    gts = {k: tokens[("ref", k)] for k in refs}
    return res, gts


def meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus METEOR 1.5 from one JVM, which is shut down afterwards."""
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait()
    return score


def caption_metrics(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr, EM, EM-refined (x100) of `preds` against `refs`.

    preds: id -> generated text; refs: id -> reference texts (at least one). Both must hold
    the same ids.
    """
    check_ids(preds, refs)
    if not preds:
        raise ValueError("caption_metrics needs at least one prediction")
    res, gts = ptb_tokenize(preds, refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{n + 1}": 100.0 * b for n, b in enumerate(bleu)}
    out["METEOR"] = 100.0 * meteor_score(gts, res)
    out["ROUGE-L"] = 100.0 * rouge
    out["CIDEr"] = 100.0 * cider
    out.update(answer_metrics(preds, refs))
    return {k: float(out[k]) for k in CAPTION_METRIC_NAMES}
