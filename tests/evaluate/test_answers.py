import pytest

from llm3d_jax.evaluate import (
    answer_metrics,
    em_by_question_type,
    exact_match,
    normalize_answer,
    refined_exact_match,
    sqa3d_question_type,
)


def test_normalize_answer():
    assert normalize_answer("The 2 Brown chairs.") == "two brown chairs"
    assert normalize_answer("  an arm-chair, 42 ") == "arm chair forty two"
    assert normalize_answer("105 apples") == "one hundred five apples"
    assert normalize_answer("1200") == "1200"


def test_exact_match_is_literal_up_to_surrounding_space():
    assert exact_match("brown chair ", ["white", "brown chair"])
    assert not exact_match("Brown chair", ["brown chair"])
    assert not exact_match("brown chairs", ["brown chair"])


def test_refined_exact_match():
    assert refined_exact_match("Brown chair", ["brown chair"])  # case
    assert refined_exact_match("the 2 chairs", ["two chairs."])  # article, number, punctuation
    assert refined_exact_match("chair", ["brown chair"])  # prediction inside answer
    assert refined_exact_match("dark brown chair", ["brown chair"])  # answer inside prediction
    assert refined_exact_match("living room", ["livingroom"])  # spaces removed
    assert not refined_exact_match("table", ["brown chair", "desk"])
    assert not refined_exact_match("", ["brown chair"])  # empty never "contained"
    assert not refined_exact_match("the", ["brown chair"])  # empty after normalisation
    assert refined_exact_match("", [""])


def test_answer_metrics_hand_computed():
    preds = {"q1": "brown chair", "q2": "Two", "q3": "table", "q4": "desk"}
    refs = {"q1": ["brown chair"], "q2": ["2"], "q3": ["big table"], "q4": ["bed"]}
    out = answer_metrics(preds, refs)
    assert out["EM"] == pytest.approx(25.0)
    assert out["EM-refined"] == pytest.approx(75.0)


def test_answer_metrics_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="no references"):
        answer_metrics({"a": "x", "b": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match="no prediction"):
        answer_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="empty reference"):
        answer_metrics({"a": "x"}, {"a": []})


def test_sqa3d_question_types():
    assert sqa3d_question_type("What is on my left?") == "what"
    assert sqa3d_question_type("is the door open") == "is"
    assert sqa3d_question_type("How many chairs are there?") == "how"
    assert sqa3d_question_type("Can I sit down?") == "can"
    assert sqa3d_question_type("Which way is the sink?") == "which"
    assert sqa3d_question_type("Facing the bed, what colour is it?") == "others"
    assert sqa3d_question_type("") == "others"


def test_em_by_question_type():
    preds = {"1": "red", "2": "blue", "3": "yes", "4": "two"}
    refs = {"1": ["red"], "2": ["green"], "3": ["yes"], "4": ["three"]}
    types = {"1": "what", "2": "what", "3": "is", "4": "how"}
    out = em_by_question_type(preds, refs, types)
    assert out == {"EM/how": 0.0, "EM/is": 100.0, "EM/what": 50.0, "EM": 50.0}
    with pytest.raises(ValueError, match="no question type"):
        em_by_question_type(preds, refs, {"1": "what"})
