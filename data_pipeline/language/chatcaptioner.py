"""ChatCaptioner prompting (3D-LLM's second data procedure): ask about views, summarise in 3D.

For a few rendered views of a scene, a questioner LLM (which never sees the images) asks one
question at a time about the view; a vision answerer replies; after `rounds` questions per view
the questioner summarises everything it learned into one description of the room, which becomes
a caption record (source "chatcaptioner", the dialogue kept in `meta`).

Backends: the questioner is any chat backend (`ChatClient` or `OfflineChat(offline_respond)`).
The answerer is a function `[(view, question)] -> [answer | ChatError]`: `http_answerer` sends
the view as a PNG to an OpenAI-compatible vision endpoint; `offline_answerer` answers from the
view's instance mask (which objects cover at least `min_pixels` pixels) and the objects' colour
names (estimated from the pixels when the scene has none), so its answers are true of the render.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from data_pipeline.language import offline
from data_pipeline.language.openai_client import ChatError, ChatRequest
from data_pipeline.language.records import make_record, validate_record

QUESTIONER_SYSTEM = (
    "You are exploring a room through photos that you cannot see. For the current photo, ask "
    "one short, informative question at a time about the objects in it (what they are, their "
    "colours, how many there are, where they are). Do not repeat questions. "
    'Reply with JSON {"question": "..."}.'
)
SUMMARY_INSTRUCTION = (
    "Summarise what you learned from all photos into one short description of the whole room. "
    "Only mention objects that were seen; do not invent objects or details. "
    'Reply with JSON {"description": "..."}.'
)
ANSWERER_SYSTEM = (
    "Answer the question about the image in a few words, truthfully. If you cannot tell, say so."
)
FIRST_QUESTION = "What objects can you see in this photo?"


def questioner_request(view: int, dialogue: Sequence[tuple[str, str]]) -> ChatRequest:
    messages = [
        {"role": "system", "content": QUESTIONER_SYSTEM},
        {"role": "user", "content": f"Photo {view}. Ask your first question."},
    ]
    for question, answer in dialogue:
        messages.append({"role": "assistant", "content": json.dumps({"question": question})})
        messages.append({"role": "user", "content": f"Answer: {answer}\nAsk your next question."})
    return ChatRequest(tuple(messages), temperature=0.0)


def summary_request(dialogues: dict[int, list[tuple[str, str]]]) -> ChatRequest:
    text = "\n".join(
        f"Photo {view}:\n" + "\n".join(f"Q: {q}\nA: {a}" for q, a in turns)
        for view, turns in dialogues.items()
    )
    return ChatRequest(
        (
            {"role": "system", "content": QUESTIONER_SYSTEM},
            {"role": "user", "content": f"{text}\n\n{SUMMARY_INSTRUCTION}"},
        ),
        temperature=0.0,
    )


def _question(value) -> str:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("question"), str)
        or not value["question"].strip()
    ):
        raise ValueError('reply needs {"question": "..."}')
    return value["question"].strip()


def _description(value) -> str:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("description"), str)
        or not value["description"].strip()
    ):
        raise ValueError('reply needs {"description": "..."}')
    return value["description"].strip()


# ------------------------------------------------------------------------------ answerers


def png_data_url(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def http_answerer(chat, views) -> Callable[[list[tuple[int, str]]], list]:
    """Answers with an OpenAI-compatible vision model (`chat`: a ChatClient), one image per request."""

    def answer(items: list[tuple[int, str]]) -> list:
        requests = [
            ChatRequest(
                (
                    {"role": "system", "content": ANSWERER_SYSTEM},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": question},
                            {
                                "type": "image_url",
                                "image_url": {"url": png_data_url(views.rgb[view])},
                            },
                        ],
                    },
                ),
                temperature=0.0,
                expect_json=False,
            )
            for view, question in items
        ]
        return chat.complete_many(requests, validate=lambda text: text.strip() or _empty())

    return answer


def _empty():
    raise ValueError("empty answer")


def estimate_color(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """The palette colour of an object's pixels [P,3]: its brightest quarter, allowing shading.

    Renders bake a shade of 0.6..1 into the colours; the brightest pixels are lit faces, so each
    palette colour is matched after the best scale in [0.8, 1].
    """
    p = np.asarray(pixels, np.float64).reshape(-1, 3)
    bright = p[np.argsort(p.sum(1))[-max(1, len(p) // 4) :]].mean(0)
    best, best_d = "", np.inf
    for name, rgb in palette.items():
        c = np.asarray(rgb, np.float64)
        s = np.clip(bright @ c / max(c @ c, 1e-9), 0.8, 1.0)
        d = np.linalg.norm(bright - s * c)
        if d < best_d:
            best, best_d = name, d
    return best


def visible_objects(instance: np.ndarray, min_pixels: int) -> list[int]:
    ids, counts = np.unique(instance[instance >= 0], return_counts=True)
    return [int(i) for i, c in zip(ids, counts) if c >= min_pixels]


def offline_answerer(
    views, scene, min_pixels: int = 50, palette: dict | None = None
) -> Callable[[list[tuple[int, str]]], list]:
    """Template vision answers from the views' instance masks (see the module docstring)."""
    objects = {o.id: o for o in offline.objects_of(scene)}
    labels = sorted({o.label for o in objects.values()})
    palette = palette or offline.synthetic.COLORS

    def color_of(view: int, oid: int) -> str:
        if objects[oid].color:
            return objects[oid].color
        return estimate_color(views.rgb[view][views.instance[view] == oid], palette)

    def answer_one(view: int, question: str) -> str:
        seen = [
            objects[i] for i in visible_objects(views.instance[view], min_pixels) if i in objects
        ]
        if question == FIRST_QUESTION:
            return (
                offline.inventory([offline.Obj(o.id, o.label, "", o.box) for o in seen])
                or "nothing"
            )
        m = re.fullmatch(r"What color is the (.+)\?", question)
        if m:
            same = [o for o in seen if o.label == m.group(1)]
            if not same:
                return "I cannot see one."
            return offline.join_words(sorted({color_of(view, o.id) for o in same}))
        m = re.fullmatch(r"How many (.+) can you see\?", question)
        if m:
            label = offline.singular(m.group(1), labels)
            return offline.number_word(sum(o.label == label for o in seen))
        return "I cannot tell."

    return lambda items: [answer_one(view, q) for view, q in items]


# ------------------------------------------------------------------------------ questioner


def _parse_inventory(text: str, labels: Sequence[str] = ()) -> list[str]:
    """Labels of an inventory answer like "a chair, a table and two lamps"."""
    out = []
    for item in re.split(r", | and ", text.strip().rstrip(".")):
        words = item.strip().split(" ", 1)
        if len(words) != 2:
            continue
        count, phrase = words
        if count in ("a", "an", "one"):
            out.append(phrase)
        elif count in offline.NUMBER_WORDS:
            out.append(offline.singular(phrase, labels))
    return out


def offline_respond(messages: Sequence[dict], temperature: float) -> str:
    """The template questioner: list the objects, then ask their colours, then their counts;
    the summary names every (colour, category) pair it was told about."""
    last = messages[-1]["content"]
    if SUMMARY_INSTRUCTION in last:
        facts: dict[str, set[str]] = {}
        for q, a in re.findall(r"Q: (.+)\nA: (.+)", last):
            if q == FIRST_QUESTION:
                for label in _parse_inventory(a):
                    facts.setdefault(label, set())
            m = re.fullmatch(r"What color is the (.+)\?", q)
            if m and not a.startswith("I cannot"):
                facts.setdefault(m.group(1), set()).update(
                    c.strip() for c in re.split(r", | and ", a)
                )
        phrases = []
        for label in sorted(facts):
            colors = sorted(facts[label]) or [""]
            phrases += [offline.article(f"{c} {label}".strip()) for c in colors]
        text = f"a room with {offline.join_words(phrases)}." if phrases else "an empty room."
        return json.dumps({"description": text})
    asked = [json.loads(m["content"])["question"] for m in messages if m["role"] == "assistant"]
    answers = [
        m["content"].split("\n")[0][len("Answer: ") :] for m in messages[2:] if m["role"] == "user"
    ]
    if not asked:
        return json.dumps({"question": FIRST_QUESTION})
    labels = _parse_inventory(answers[0])
    for question in [f"What color is the {label}?" for label in labels] + [
        f"How many {offline.plural(label)} can you see?" for label in labels
    ]:
        if question not in asked:
            return json.dumps({"question": question})
    return json.dumps({"question": "Is there anything else?"})


# ------------------------------------------------------------------------------ procedure


def records_for_scene(
    scene, views, questioner, answerer, rounds: int = 3, max_views: int = 4, min_pixels: int = 50
) -> tuple[list[dict], list[str]]:
    """(records, problems): one caption record summarising `rounds` questions on each of up to
    `max_views` evenly spaced views."""
    n = len(views.rgb)
    chosen = sorted({int(round(k)) for k in np.linspace(0, n - 1, min(max_views, n))})
    dialogues: dict[int, list[tuple[str, str]]] = {k: [] for k in chosen}
    problems = []
    for _ in range(rounds):
        requests = [questioner_request(k, dialogues[k]) for k in chosen]
        questions = questioner.complete_many(requests, validate=_question)
        asked = [(k, q) for k, q in zip(chosen, questions) if not isinstance(q, ChatError)]
        problems += [
            f"{scene.scene_id}: question on view {k}: {q}"
            for k, q in zip(chosen, questions)
            if isinstance(q, ChatError)
        ]
        for (k, q), a in zip(asked, answerer(asked)):
            if isinstance(a, ChatError):
                problems.append(f"{scene.scene_id}: answer on view {k}: {a}")
            else:
                dialogues[k].append((q, a))
    try:
        description = questioner.complete(summary_request(dialogues), validate=_description)
    except ChatError as err:
        return [], problems + [f"{scene.scene_id}: summary: {err}"]
    seen = sorted({i for k in chosen for i in visible_objects(views.instance[k], min_pixels)})
    meta = {"views": chosen, "dialogue": [[k, q, a] for k in chosen for q, a in dialogues[k]]}
    record = make_record(
        scene.scene_id, "caption", "Describe the room.", [description], seen, "chatcaptioner", meta
    )
    try:
        validate_record(record)
    except ValueError as err:
        return [], problems + [f"{scene.scene_id}: rejected record: {err}"]
    return [record], problems
