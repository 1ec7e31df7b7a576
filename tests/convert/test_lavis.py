"""Import of a released-3D-LLM-layout LAVIS checkpoint (tiny fixture made by torch)."""

import copy
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from llm3d_jax.convert import lavis
from llm3d_jax.fileio import InputError, cli_main
from llm3d_jax.model import llm3d

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens")
FIXTURE = os.path.join(GOLDENS, "lavis", "lavis_tiny.pth")
BASE = os.path.join(GOLDENS, "qformer", "blip2_tiny")
INPUTS = ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask", "answer_ids")


def _npz(name):
    with np.load(os.path.join(GOLDENS, "lavis", name), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def imported():
    return lavis.from_lavis(FIXTURE, BASE, loc_offset=60)


def test_state_dict_reads_back_exactly():
    saved = _npz("lavis_tiny.npz")
    got = lavis.read_lavis_state(FIXTURE)
    want = {k: v for k, v in saved.items() if k not in ("loc_offset", "loc_bins")}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_params_come_from_the_checkpoint_and_the_base(imported):
    module, params = imported
    saved, base = _npz("lavis_tiny.npz"), load_file(os.path.join(BASE, "model.safetensors"))
    cfg = module.config.llm
    assert (cfg.loc_offset, cfg.loc_bins, cfg.activation) == (60, 8, "gelu")
    q = params["qformer"]
    np.testing.assert_array_equal(
        q["layer_2"]["crossattention"]["value"]["kernel"],
        saved["Qformer.bert.encoder.layer.2.crossattention.self.value.weight"].T,
    )
    np.testing.assert_array_equal(
        q["layer_1"]["mlp"]["norm"]["scale"],
        saved["Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight"],
    )
    np.testing.assert_array_equal(
        q["layernorm"]["bias"], saved["Qformer.bert.embeddings.LayerNorm.bias"]
    )
    np.testing.assert_array_equal(q["query_tokens"], saved["query_tokens"])
    np.testing.assert_array_equal(params["proj"]["kernel"], saved["t5_proj.weight"].T)
    llm, shared, head = (
        params["llm"],
        saved["t5_model.shared.weight"],
        saved["t5_model.lm_head.weight"],
    )
    np.testing.assert_array_equal(llm["shared"][:60], shared[:60])
    np.testing.assert_array_equal(llm["loc_embed"], shared[60:])
    # rows 60..63 of the base vocabulary are not reachable ids any more: kept from the base
    np.testing.assert_array_equal(llm["shared"][60:], base["language_model.shared.weight"][60:])
    np.testing.assert_array_equal(llm["lm_head"][:, :60], head[:60].T)
    np.testing.assert_array_equal(llm["loc_head"], head[60:].T)
    # the frozen T5 body comes from the base directory
    np.testing.assert_array_equal(
        llm["encoder"]["block_0"]["self_attn"]["q"]["kernel"],
        base["language_model.encoder.block.0.layer.0.SelfAttention.q.weight"].T,
    )


def test_logits_match_the_reference_forward(imported):
    module, params = imported
    io = _npz("lavis_tiny_io.npz")
    args = [io[k] for k in INPUTS] + [io["answer_mask"]]
    logits = jax.jit(module.apply)({"params": params}, *args)
    assert logits.shape == io["logits"].shape == (2, 6, 68)
    assert np.abs(np.asarray(logits) - io["logits"]).max() <= 1e-4
    # LAVIS's exact-GELU T5 is not FlanT5's tanh GELU: the difference is visible at this scale
    llm = dataclasses.replace(module.config.llm, activation="gelu_new")
    flan = llm3d.LLM3D(dataclasses.replace(module.config, llm=llm))
    assert (
        np.abs(np.asarray(jax.jit(flan.apply)({"params": params}, *args)) - io["logits"]).max()
        > 1e-4
    )


@pytest.mark.parametrize(
    "name,problem",
    [
        ("unsafe.pth", "refused unsafe pickle global argparse.Namespace"),
        ("tensors.pth", "not a 3D-LLM LAVIS checkpoint: no query_tokens, t5_proj.weight, Qformer"),
        ("lavis_bad_shape.pth", "shape mismatch for t5_proj.weight: checkpoint (16, 30)"),
        ("lavis_partial.pth", "missing weights for"),
    ],
)
def test_bad_checkpoints_fail_with_one_line(name, problem, capsys):
    path = os.path.join(GOLDENS, "lavis", name)
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        lavis.from_lavis(path, BASE)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: lavis.main([path, "--base", BASE]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and problem in err


def test_cli_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: lavis.main([FIXTURE, "--base", BASE, "--loc-offset", "60"]))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "location tokens: 8 from id 60; T5 activation gelu" in out
    assert "optimizer: AdamW state at step 3" in out


def test_loc_offset_outside_vocabulary():
    with pytest.raises(InputError, match="loc_offset 70 outside the T5 vocabulary 1..64"):
        lavis.from_lavis(FIXTURE, BASE, loc_offset=70)


# ---------------------------------------------------------------------- optimizer state


def test_optimizer_state_is_numbered_as_lavis_numbers_it():
    state, optimizer = lavis.read_lavis_checkpoint(FIXTURE)
    entries, step, groups = lavis.lavis_optimizer_state(state, optimizer, FIXTURE)
    with open(os.path.join(GOLDENS, "lavis", "lavis_tiny_ids.json")) as f:
        ids = json.load(f)  # what torch numbered (tools/make_lavis_fixture.py)
    assert step == 3 and [g["params"] for g in groups] == [30, 47]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0
    # ln_vision trains in LAVIS but never gets a gradient: no state
    assert sorted(entries) == sorted(k for k in ids if not k.startswith("ln_vision."))
    for name, (exp_avg, exp_avg_sq) in entries.items():
        saved = optimizer["state"][ids[name]]
        np.testing.assert_array_equal(exp_avg, saved["exp_avg"], err_msg=name)
        np.testing.assert_array_equal(exp_avg_sq, saved["exp_avg_sq"], err_msg=name)


def test_moments_come_in_the_params_layout(imported):
    module, params, moments = lavis.from_lavis(FIXTURE, BASE, loc_offset=60, with_optimizer=True)
    state, optimizer = lavis.read_lavis_checkpoint(FIXTURE)
    entries, _, _ = lavis.lavis_optimizer_state(state, optimizer, FIXTURE)
    assert moments.count == 3
    exp_avg_sq = entries["t5_model.lm_head.weight"][1]
    np.testing.assert_array_equal(moments.nu["llm"]["loc_head"], exp_avg_sq[60:].T)
    np.testing.assert_array_equal(moments.nu["llm"]["lm_head"][:, :60], exp_avg_sq[:60].T)
    assert not moments.nu["llm"]["lm_head"][:, 60:].any()  # base rows past loc_offset: no state
    np.testing.assert_array_equal(
        moments.mu["qformer"]["layer_0"]["attention"]["query"]["kernel"],
        entries["Qformer.bert.encoder.layer.0.attention.self.query.weight"][0].T,
    )
    # only what the state reaches: the frozen T5 body has none
    assert set(moments.mu) == {"qformer", "proj", "llm"}
    assert set(moments.mu["llm"]) == {"shared", "loc_embed", "lm_head", "loc_head"}
    flat = lambda tree: {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}
    want = flat(params)
    assert all(want[k] == shape for k, shape in flat(moments.mu).items())
    assert len(moments.covered) == len(flat(moments.nu))
    assert lavis.from_lavis(
        os.path.join(GOLDENS, "lavis", "lavis_no_optimizer.pth"), BASE, loc_offset=60,
        with_optimizer=True,
    )[2] is None  # fmt: skip


def _broken(change):
    state, optimizer = lavis.read_lavis_checkpoint(FIXTURE)
    optimizer = copy.deepcopy(optimizer)
    replaced = change(optimizer)  # None: changed in place
    return state, optimizer if replaced is None else replaced


def _move_one_id(opt):
    opt["param_groups"][0]["params"].append(opt["param_groups"][1]["params"].pop())


def _drop(index, key):
    def change(opt):
        del opt["state"][index][key]

    return change


def _set_entry(index, **values):
    return lambda opt: opt["state"][index].update(values)


@pytest.mark.parametrize(
    "change,problem",
    [
        (lambda opt: [], "not a torch optimizer state_dict"),
        (lambda opt: {"state": {}, "param_groups": [{"params": "x"}]}, "without a list of"),
        (lambda opt: opt["param_groups"].append({"params": []}), "3 param groups"),
        (_move_one_id, "param groups of [31, 46] parameters, the saved weights give [30, 47]"),
        (lambda opt: opt["param_groups"][0].update(amsgrad=True), "AMSGrad"),
        (lambda opt: opt["state"].update({999: {}}), "parameter id 999, in no param group"),
        (_drop(0, "exp_avg_sq"), "query_tokens lacks step/exp_avg"),
        (_set_entry(0, exp_avg=np.zeros((1, 8, 32), np.int64)), "exp_avg of query_tokens is not"),
        (_set_entry(0, step=np.float32(2.5)), "step of query_tokens is 2.5, not a count"),
        (_set_entry(0, step="three"), "step of query_tokens is not a number"),
        (_set_entry(4, step=np.float32(7)), "stepped unequally"),
    ],
)
def test_malformed_optimizer_state_is_one_error(change, problem):
    state, optimizer = _broken(change)
    with pytest.raises(InputError, match=re.escape(problem)) as err:
        lavis.lavis_optimizer_state(state, optimizer, FIXTURE)
    assert err.value.path == FIXTURE and "\n" not in str(err.value)


def test_bad_optimizer_file_fails_only_when_its_state_is_asked_for():
    bad = os.path.join(GOLDENS, "lavis", "lavis_bad_optimizer.pth")
    lavis.from_lavis(bad, BASE, loc_offset=60)  # the weights alone are fine
    with pytest.raises(InputError, match=re.escape("exp_avg of t5_proj.weight has shape (32, 16)")):
        lavis.from_lavis(bad, BASE, loc_offset=60, with_optimizer=True)
