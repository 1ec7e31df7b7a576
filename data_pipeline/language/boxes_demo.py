"""Boxes-demonstration-instruction prompting (3D-LLM's first data procedure).

The scene goes to the LLM as one line per object, `label(k): [x0, y0, z0, x1, y1, z1]` (metres,
the colour name leads the label when known, e.g. `red chair(3): [...]`). Each task has a system
prompt and one hand-written demonstration pair (an example scene and the reply we want), then the
query scene follows. Each (scene, task) is asked several times at rising temperature; replies are
JSON, validated (object ids must exist; no invented coordinates: boxes in answers come from the
scene, never from the LLM), and turned into records (source "boxes_demo").
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Sequence

import numpy as np

from data_pipeline.language import offline
from data_pipeline.language.openai_client import ChatError, ChatRequest
from data_pipeline.language.records import format_box, make_record, validate_record

TEMPERATURES = (0.2, 0.6, 1.0)
_RULES = (
    "Only mention objects from the list; never invent objects. The numbers are axis-aligned boxes "
    "in metres (x0 y0 z0 x1 y1 z1, z is up); use them to reason about positions and sizes, but "
    "never write coordinates in your answer. Reply with one JSON object and nothing else."
)
SYSTEM_PROMPTS = {
    "caption": "You are given the objects of one room. Write a short description of the room "
    "as a human would see it. " + _RULES + ' Format: {"description": "..."}',
    "dialogue": "You are given the objects of one room. Write a short conversation between a "
    "human in the room and a helpful robot that knows the room. "
    + _RULES
    + ' Format: {"conversation": [{"human": "...", "robot": "..."}, ...]}',
    "task_decomposition": "You are given the objects of one room. Propose household tasks a robot "
    "could do in this room and break each into short numbered-free steps. "
    + _RULES
    + ' Format: {"items": [{"task": "...", "steps": ["...", ...], "objects": [k, ...]}]}',
    "affordance": "You are given the objects of one room. Ask questions about what the objects "
    "can be used for, and answer them in a few words. "
    + _RULES
    + ' Format: {"items": [{"question": "...", "answer": "...", "objects": [k, ...]}]}',
    "qa": "You are given the objects of one room. Ask questions about the room whose answer "
    "the list settles (whether an object is there, how many, its colour, which is bigger, what "
    "stands on or near what) and answer each in a few words. "
    + _RULES
    + ' Format: {"items": [{"question": "...", "answer": "...", "objects": [k, ...]}]}',
    "grounding": "You are given the objects of one room. For some objects write a referring "
    "expression that singles out exactly that object (by category, colour, size or its "
    "relation to other objects). "
    + _RULES
    + ' Format: {"items": [{"object": k, "expression": "the ..."}]}',
}
TASKS = tuple(SYSTEM_PROMPTS)

DEMO_SCENE = """table(0): [1.00, 1.00, 0.00, 2.20, 1.80, 0.75]
red chair(1): [0.40, 1.10, 0.00, 0.90, 1.60, 0.95]
blue chair(2): [2.30, 1.20, 0.00, 2.80, 1.70, 0.95]
white lamp(3): [1.20, 1.10, 0.75, 1.45, 1.35, 1.25]
bed(4): [3.50, 0.20, 0.00, 5.50, 1.80, 0.60]"""
DEMO_REPLIES = {
    "caption": {
        "description": "a bedroom with a bed along the wall and a table with a white lamp "
        "between a red chair and a blue chair."
    },
    "dialogue": {
        "conversation": [
            {"human": "Is there a place to read here?", "robot": "yes, the table has a lamp."},
            {"human": "Which chair is closer to the bed?", "robot": "the blue chair."},
        ]
    },
    "task_decomposition": {
        "items": [
            {
                "task": "put the lamp next to the bed",
                "steps": [
                    "go to the table",
                    "pick up the lamp",
                    "walk to the bed",
                    "put the lamp down beside the bed",
                ],
                "objects": [3, 0, 4],
            }
        ]
    },
    "affordance": {
        "items": [
            {
                "question": "Where can I sit?",
                "answer": "on a chair or the bed",
                "objects": [1, 2, 4],
            },
            {"question": "What can I use to read at night?", "answer": "the lamp", "objects": [3]},
        ]
    },
    "qa": {
        "items": [
            {"question": "How many chairs are in the room?", "answer": "two", "objects": [1, 2]},
            {"question": "What color is the lamp?", "answer": "white", "objects": [3]},
            {"question": "Is there a sofa in the room?", "answer": "no", "objects": []},
        ]
    },
    "grounding": {
        "items": [
            {"object": 1, "expression": "the red chair"},
            {"object": 2, "expression": "the chair next to the bed"},
        ]
    },
}
_LINE = re.compile(r"^(?P<name>[^()\n]+)\((?P<id>-?\d+)\): \[(?P<box>[^\]]*)\]$", re.MULTILINE)


def scene_lines(objects: Sequence[offline.Obj]) -> str:
    """One `label(k): [x0, y0, z0, x1, y1, z1]` line per object, colour first when known."""
    return "\n".join(
        f"{(o.color + ' ' + o.label).strip()}({o.id}): ["
        + ", ".join(f"{v:.2f}" for v in o.box)
        + "]"
        for o in objects
    )


def build_request(task: str, lines: str, temperature: float) -> ChatRequest:
    demo = json.dumps(DEMO_REPLIES[task])
    return ChatRequest(
        messages=(
            {"role": "system", "content": SYSTEM_PROMPTS[task]},
            {"role": "user", "content": f"Objects:\n{DEMO_SCENE}"},
            {"role": "assistant", "content": demo},
            {"role": "user", "content": f"Objects:\n{lines}"},
        ),
        temperature=temperature,
    )


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _ids(value, known: set[int]) -> list[int]:
    if not isinstance(value, list) or any(
        isinstance(i, bool) or not isinstance(i, int) for i in value
    ):
        raise ValueError(f"objects must be a list of integers, got {value!r:.60}")
    unknown = [i for i in value if i not in known]
    if unknown:
        raise ValueError(f"reply names objects {unknown} that are not in the scene")
    return list(value)


def _items(reply, key: str) -> list:
    if not isinstance(reply, dict) or not isinstance(reply.get(key), list):
        raise ValueError(f"reply needs a list {key!r}")
    if not all(isinstance(item, dict) for item in reply[key]):
        raise ValueError(f"every entry of {key!r} must be an object")
    return reply[key]


def parse_reply(
    task: str, reply, objects: Sequence[offline.Obj]
) -> list[tuple[str, str, list[int]]]:
    """(prompt, answer, object_ids) triples from a task's JSON reply; ValueError when malformed."""
    known = {o.id: o for o in objects}
    if task == "caption":
        if not isinstance(reply, dict):
            raise ValueError("reply must be a JSON object")
        return [("Describe the room.", _text(reply.get("description"), "description"), list(known))]
    if task == "dialogue":
        out, history = [], ""
        for turn in _items(reply, "conversation"):
            human = _text(turn.get("human"), "human turn")
            robot = _text(turn.get("robot"), "robot turn")
            out.append((f"{history}Human: {human}", robot, []))
            history += f"Human: {human}\nRobot: {robot}\n"
        return out
    if task == "task_decomposition":
        out = []
        for item in _items(reply, "items"):
            steps = item.get("steps")
            if not isinstance(steps, list) or not steps:
                raise ValueError("steps must be a non-empty list")
            steps = [_text(s, "step").rstrip(".") for s in steps]
            answer = " ".join(f"{k}. {s}." for k, s in enumerate(steps, 1))
            task_text = _text(item.get("task"), "task").rstrip(".?")
            out.append(
                (f"How do I {task_text}?", answer, _ids(item.get("objects", []), set(known)))
            )
        return out
    if task in ("affordance", "qa"):
        return [
            (
                _text(item.get("question"), "question"),
                _text(item.get("answer"), "answer"),
                _ids(item.get("objects", []), set(known)),
            )
            for item in _items(reply, "items")
        ]
    if task == "grounding":
        out = []
        for item in _items(reply, "items"):
            (k,) = _ids([item.get("object")], set(known))
            expression = _text(item.get("expression"), "expression").rstrip(".?")
            out.append((f"Where is {expression}?", format_box(known[k].box), [k]))
        return out
    raise ValueError(f"unknown boxes-demo task {task!r}")


def reply_records(
    task: str, reply, scene_id: str, objects: Sequence[offline.Obj], temperature: float
) -> list[dict]:
    """Validated records of one reply; ValueError (the client retries) when anything is malformed."""
    records = []
    for prompt, answer, ids in parse_reply(task, reply, objects):
        meta = {"temperature": temperature}
        record = make_record(scene_id, task, prompt, [answer], ids, "boxes_demo", meta)
        validate_record(record)
        records.append(record)
    return records


def records_for_scene(
    scene,
    chat,
    tasks: Sequence[str] = TASKS,
    temperatures: Sequence[float] = TEMPERATURES,
    desc: str | None = None,
) -> tuple[list[dict], list[str]]:
    """(records, failures): one request per (task, temperature), answered by `chat` as a batch.

    A reply that does not parse into valid records is retried by the client (never cached); a
    request still failing after the retries is a failure, and the scene's other replies are kept.
    """
    objects = offline.objects_of(scene)
    lines = scene_lines(objects)
    jobs = [(task, t) for task in tasks for t in temperatures]
    checks = [
        functools.partial(
            reply_records, task, scene_id=scene.scene_id, objects=objects, temperature=t
        )
        for task, t in jobs
    ]
    replies = chat.complete_many(
        [build_request(task, lines, t) for task, t in jobs], validate=checks, desc=desc
    )
    records, failures = [], []
    for (task, t), reply in zip(jobs, replies):
        if isinstance(reply, ChatError):
            failures.append(f"{scene.scene_id}: {task} at temperature {t}: {reply}")
        else:
            records += reply
    return records, failures


# ------------------------------------------------------------------ the offline template "LLM"


def parse_scene_lines(
    text: str, colors: Sequence[str] = offline.DEFAULT_COLORS
) -> list[offline.Obj]:
    """The objects of `label(k): [box]` lines; a leading known colour name becomes the colour."""
    objects = []
    by_length = sorted(colors, key=len, reverse=True)
    for m in _LINE.finditer(text):
        name = m.group("name").strip()
        color = next((c for c in by_length if name.startswith(c + " ")), "")
        box = np.asarray([float(v) for v in m.group("box").split(",")], np.float64)
        objects.append(offline.Obj(int(m.group("id")), name[len(color) :].strip(), color, box))
    return objects


def offline_respond(messages: Sequence[dict], temperature: float) -> str:
    """Answers a boxes-demo request from the object lines of its last message, truthfully.

    The temperature picks which true facts are sampled, so the passes differ like an LLM's.
    """
    system, query = messages[0]["content"], messages[-1]["content"]
    task = next(t for t, p in SYSTEM_PROMPTS.items() if p == system)
    objects = parse_scene_lines(query)
    boxes = np.asarray([o.box for o in objects]).reshape(-1, 6)
    room = offline.Room(
        boxes[:, 0].min() - 1,
        boxes[:, 1].min() - 1,
        boxes[:, 3].max() + 1,
        boxes[:, 4].max() + 1,
        boxes[:, 2].min(),
    )
    facts = offline.facts_for("query", objects, room)
    rng = np.random.default_rng([int(round(temperature * 100)), zlib.crc32(query.encode())])
    if task == "caption":
        return json.dumps({"description": f"a room with {offline.inventory(objects)}."})
    if task == "dialogue":
        pairs = [
            (p.rsplit("Human: ", 1)[1], a)
            for p, a, _, _ in offline.dialogues(facts, rng)
            if "\n" in p
        ]
        first = ("What is in this room?", f"there is {offline.inventory(objects)}.")
        turns = [first] + pairs[: 1 + int(rng.integers(2))]
        return json.dumps({"conversation": [{"human": h, "robot": r} for h, r in turns]})
    if task == "task_decomposition":
        items = []
        for prompt, answer, ids, _ in offline.decompositions(facts, rng):
            steps = [s.strip().rstrip(".") for s in re.split(r"\d+\. ", answer) if s.strip()]
            items.append(
                {"task": prompt[len("How do I ") :].rstrip("?"), "steps": steps, "objects": ids}
            )
        return json.dumps({"items": items[:2]})
    if task == "affordance":
        items = [
            {"question": p, "answer": a, "objects": i}
            for p, a, i, _ in offline.affordances(facts, rng)
        ]
        return json.dumps({"items": offline.sample(rng, items, 3)})
    if task == "qa":
        items = [
            {"question": p, "answer": a, "objects": i}
            for p, a, i, _ in offline.questions(facts, rng)
        ]
        return json.dumps({"items": offline.sample(rng, items, 4)})
    named = [{"object": k, "expression": f"the {name}"} for k, name in sorted(facts.names.items())]
    return json.dumps({"items": offline.sample(rng, named, 3)})
