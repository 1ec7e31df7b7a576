"""The three prompting procedures with the offline template backend (HTTP: test_language_openai)."""

import json
import re
import types

import numpy as np
import pytest

from data_pipeline.language import boxes_demo, chatcaptioner, offline, revision
from data_pipeline.language.openai_client import ChatError, ChatRequest, OfflineChat
from data_pipeline.language.records import parse_locations, validate_record
from data_pipeline.render import render_scene
from data_pipeline.scenes.synthetic import COLORS, make_scene


class Recorder:
    """A chat backend that records requests and answers with scripted replies."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []

    def complete_many(self, requests, validate=None, desc=None):
        self.requests += requests
        out = []
        checks = validate if isinstance(validate, list) else [validate] * len(requests)
        for check in checks:
            reply = self.replies.pop(0)
            try:
                out.append(check(reply) if check else reply)
            except ValueError as err:
                out.append(ChatError(str(err)))
        return out


def test_boxes_demo_prompt_layout():
    scene = make_scene(2, 0)
    objs = offline.objects_of(scene)
    lines = boxes_demo.scene_lines(objs)
    first = objs[0]
    assert (
        lines.split("\n")[0]
        == f"{first.color} {first.label}({first.id}): ["
        + ", ".join(f"{v:.2f}" for v in first.box)
        + "]"
    )
    assert [(o.id, o.label, o.color) for o in boxes_demo.parse_scene_lines(lines)] == [
        (o.id, o.label, o.color) for o in objs
    ]
    req = boxes_demo.build_request("affordance", lines, 0.6)
    roles = [m["role"] for m in req.messages]
    assert roles == [
        "system",
        "user",
        "assistant",
        "user",
    ]  # system prompt, one demonstration pair, query
    assert "never invent objects" in req.messages[0]["content"]
    assert json.loads(req.messages[2]["content"]) == boxes_demo.DEMO_REPLIES["affordance"]
    assert req.temperature == 0.6 and req.messages[3]["content"].endswith(lines)


def test_boxes_demo_offline_records_are_valid_and_grounded():
    scene = make_scene(2, 0)
    objs = {o.id: o for o in scene.objects}
    records, failures = boxes_demo.records_for_scene(scene, OfflineChat(boxes_demo.offline_respond))
    assert failures == []
    assert {r["task"] for r in records} == set(boxes_demo.TASKS)
    assert sorted({r["meta"]["temperature"] for r in records}) == list(boxes_demo.TEMPERATURES)
    for r in records:
        validate_record(r)
        assert r["source"] == "boxes_demo"
        if r["task"] == "grounding":
            (k,) = r["object_ids"]
            np.testing.assert_allclose(
                parse_locations(r["answers"][0])[0][0], objs[k].box, atol=0.006
            )
            name = re.fullmatch(r"Where is the (.+)\?", r["prompt"]).group(1)
            assert name in (objs[k].label, f"{objs[k].color} {objs[k].label}")
        if r["task"] == "caption":
            for o in scene.objects:
                assert o.label in r["answers"][0]


@pytest.mark.parametrize(
    "task, reply, problem",
    [
        ("grounding", {"items": [{"object": 99, "expression": "the cat"}]}, "not in the scene"),
        ("grounding", {"items": [{"object": 0}]}, "expression must be a non-empty string"),
        (
            "affordance",
            {"items": [{"question": "Where?", "answer": "", "objects": []}]},
            "answer must be",
        ),
        ("caption", ["not", "an", "object"], "reply must be a JSON object"),
        (
            "task_decomposition",
            {"items": [{"task": "x", "steps": []}]},
            "steps must be a non-empty list",
        ),
        (
            "affordance",
            {"items": [{"question": "Where?", "answer": "at <box>1 2 3</box>", "objects": []}]},
            "<box> needs 6 numbers",
        ),
    ],
)
def test_boxes_demo_rejects_malformed_replies(task, reply, problem):
    scene = make_scene(2, 0)
    good = json.loads(
        boxes_demo.offline_respond(
            boxes_demo.build_request(
                task, boxes_demo.scene_lines(offline.objects_of(scene)), 0.2
            ).messages,
            0.2,
        )
    )
    chat = Recorder([reply, good])
    records, failures = boxes_demo.records_for_scene(
        scene, chat, tasks=(task,), temperatures=(0.2, 1.0)
    )
    assert len(failures) == 1 and problem in failures[0] and "temperature 0.2" in failures[0]
    assert records and all(r["meta"]["temperature"] == 1.0 for r in records)


def test_boxes_demo_dialogue_turns_become_history():
    scene = make_scene(2, 1)
    reply = {
        "conversation": [{"human": "Hi?", "robot": "hello."}, {"human": "Lamp?", "robot": "yes."}]
    }
    records, _ = boxes_demo.records_for_scene(
        scene, Recorder([reply]), tasks=("dialogue",), temperatures=(0.2,)
    )
    assert [(r["prompt"], r["answers"]) for r in records] == [
        ("Human: Hi?", ["hello."]),
        ("Human: Hi?\nRobot: hello.\nHuman: Lamp?", ["yes."]),
    ]


@pytest.fixture(scope="module")
def rendered():
    scene = make_scene(4, 2)
    return scene, render_scene(scene, num_views=3, width=96, height=72, seed=0)


def test_chatcaptioner_offline_is_true_of_the_renders(rendered):
    scene, views = rendered
    objs = {o.id: o for o in scene.objects}
    answerer = chatcaptioner.offline_answerer(views, scene, min_pixels=20)
    records, failures = chatcaptioner.records_for_scene(
        scene,
        views,
        OfflineChat(chatcaptioner.offline_respond),
        answerer,
        rounds=3,
        max_views=3,
        min_pixels=20,
    )
    assert failures == [] and len(records) == 1
    (r,) = records
    validate_record(r)
    assert (
        r["task"] == "caption"
        and r["source"] == "chatcaptioner"
        and r["meta"]["views"] == [0, 1, 2]
    )
    seen = {}
    for view, q, a in r["meta"]["dialogue"]:
        visible = chatcaptioner.visible_objects(views.instance[view], 20)
        if q == chatcaptioner.FIRST_QUESTION:
            labels = sorted(objs[i].label for i in visible)
            assert a == (
                offline.inventory([offline.Obj(i, objs[i].label, "", objs[i].box) for i in visible])
                or "nothing"
            )
            assert sorted(set(labels)) == sorted(set(chatcaptioner._parse_inventory(a)))
        elif m := re.fullmatch(r"How many (.+) can you see\?", q):
            assert offline.NUMBER_WORDS.index(a) == sum(
                offline.plural(objs[i].label) == m.group(1) for i in visible
            )
        else:
            label = re.fullmatch(r"What color is the (.+)\?", q).group(1)
            colours = {objs[i].color for i in visible if objs[i].label == label}
            assert set(re.split(r", | and ", a)) == colours
            seen.setdefault(label, set()).update(colours)
    assert set(r["object_ids"]) == {
        i for v in range(3) for i in chatcaptioner.visible_objects(views.instance[v], 20)
    }
    # every "colour label" phrase of the summary is an object of the scene
    body = r["answers"][0][len("a room with ") : -1]
    for item in re.split(r", | and ", body):
        phrase = item.split(" ", 1)[1]
        assert any(phrase in (o.label, f"{o.color} {o.label}") for o in scene.objects), phrase


def test_vision_colours_from_pixels_and_http_requests_carry_the_image():
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[0, :, :4] = np.asarray(COLORS["teal"]) * 0.9
    rgb[0, :, 4:] = np.asarray(COLORS["dark green"]) * 0.95
    inst = np.zeros((1, 8, 8), np.int32)
    inst[0, :, 4:] = 1
    scene = types.SimpleNamespace(
        objects=[
            types.SimpleNamespace(id=0, label="box", box=np.zeros(6), color=""),
            types.SimpleNamespace(id=1, label="plant", box=np.zeros(6), color=""),
        ]
    )
    views = types.SimpleNamespace(rgb=rgb, instance=inst)
    answer = chatcaptioner.offline_answerer(views, scene, min_pixels=4)
    assert answer(
        [
            (0, "What color is the box?"),
            (0, "What color is the plant?"),
            (0, "How many boxes can you see?"),
        ]
    ) == ["teal", "dark green", "one"]
    chat = Recorder(["a teal box"])
    assert chatcaptioner.http_answerer(chat, views)([(0, "What is this?")]) == ["a teal box"]
    (req,) = chat.requests
    assert isinstance(req, ChatRequest) and not req.expect_json
    parts = req.messages[1]["content"]
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_revision_offline_answers_follow_the_source_and_the_scene():
    scene = make_scene(4, 3)
    objs = scene.objects
    sources = offline.generate(scene, 0, ("caption", "dense_caption"))
    records, failures = revision.revise(sources, OfflineChat(revision.offline_respond), "qa")
    assert failures == [] and records
    ids = {r["id"] for r in sources}
    kinds = set()
    for r in records:
        validate_record(r)
        assert r["task"] == "qa" and r["source"] == "revision" and r["meta"]["revised_from"] in ids
        q, a = r["prompt"], r["answers"][0]
        if m := re.fullmatch(r"What (is the|color is the) object at (<box>.*</box>)\?", q):
            kinds.add("dense")
            box = parse_locations(m.group(2))[0][0]
            (o,) = [o for o in objs if np.allclose(o.box, box, atol=0.006)]
            assert a == (o.label if m.group(1) == "is the" else o.color)
        elif m := re.fullmatch(r"How many (.+) are there\?", q):
            kinds.add("count")
            assert offline.NUMBER_WORDS.index(a) == sum(
                offline.plural(o.label) == m.group(1) for o in objs
            )
        elif m := re.fullmatch(r"What color is the (.+)\?", q):
            kinds.add("color")
            assert [o.color for o in objs if o.label == m.group(1)] == [a]
        elif m := re.fullmatch(r"Is there an? (.+)\?", q):
            assert a == "yes" and any(o.label == m.group(1) for o in objs)
        else:
            raise AssertionError(q)
    assert kinds == {"dense", "count", "color"}
    # unsupported rewrites are left alone
    assert revision.revise(sources, OfflineChat(revision.offline_respond), "grounding") == ([], [])
