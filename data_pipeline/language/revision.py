"""Revision prompting (3D-LLM's third data procedure): rewrite records of one task into another.

Supported rewrites: captions into QA (questions the description answers) and dense captions into
QA about the located object (its category and colour, keeping its `<box>` in the question). The
LLM sees only the annotation, never the scene, so every new answer is a fact the annotation
states. New records keep the scene and object ids of their source and point to it with
`meta.revised_from` (the command line assigns splits by scene afterwards).
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
from data_pipeline.language.records import make_record, validate_record

_FORMAT = (
    "Use only facts stated in the annotation; never invent objects. Answers are 1 to 3 words. "
    'Reply with one JSON object: {"items": [{"question": "...", "answer": "..."}]}.'
)
SYSTEM_PROMPTS = {
    ("caption", "qa"): "You are given a description of a room. Rewrite it into question-answer "
    "pairs about the room (which objects there are, how many, their colours). " + _FORMAT,
    ("dense_caption", "qa"): "You are given a description of one object of a room, which the "
    "question locates with a <box>...</box>. Rewrite it into question-answer pairs about that "
    "object; refer to it as 'the object at' followed by the <box>...</box> copied exactly. "
    + _FORMAT,
}
REWRITES = tuple(SYSTEM_PROMPTS)


def build_request(record: dict, to_task: str) -> ChatRequest:
    return ChatRequest(
        (
            {"role": "system", "content": SYSTEM_PROMPTS[(record["task"], to_task)]},
            {
                "role": "user",
                "content": f"Question: {record['prompt']}\nAnnotation: {record['answers'][0]}",
            },
        ),
        temperature=0.0,
    )


def revised_records(reply, src: dict, to_task: str) -> list[dict]:
    """Validated records of one reply; ValueError (the client retries) when anything is malformed."""
    if not isinstance(reply, dict) or not isinstance(reply.get("items"), list):
        raise ValueError('reply needs {"items": [...]}')
    out = []
    for item in reply["items"]:
        q, a = (
            (item.get("question"), item.get("answer")) if isinstance(item, dict) else (None, None)
        )
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise ValueError(f"item needs a non-empty question and answer: {item!r:.80}")
        meta = {"revised_from": src["id"]}
        record = make_record(
            src["scene_id"], to_task, q.strip(), [a.strip()], src["object_ids"], "revision", meta
        )
        validate_record(record)
        out.append(record)
    return out


def revise(
    records: Sequence[dict], chat, to_task: str = "qa", desc: str | None = None
) -> tuple[list[dict], list[str]]:
    """(new records, failures) for every record whose (task, to_task) is a supported rewrite."""
    sources = [r for r in records if (r["task"], to_task) in SYSTEM_PROMPTS]
    checks = [functools.partial(revised_records, src=r, to_task=to_task) for r in sources]
    replies = chat.complete_many(
        [build_request(r, to_task) for r in sources], validate=checks, desc=desc
    )
    out, failures = [], []
    for src, reply in zip(sources, replies):
        if isinstance(reply, ChatError):
            failures.append(f"{src['id']}: {reply}")
        else:
            out += reply
    return out, failures


# ------------------------------------------------------------------ the offline template "LLM"


def _phrase(item: str, colors: Sequence[str]) -> tuple[int | None, str, str] | None:
    """(count or None for "a/an", colour, label) of "a red chair" / "two chairs"; None otherwise."""
    words = item.strip().split(" ", 1)
    if len(words) != 2:
        return None
    head, rest = words
    color = next((c for c in sorted(colors, key=len, reverse=True) if rest.startswith(c + " ")), "")
    label = rest[len(color) :].strip()
    if head in ("a", "an"):
        return None, color, label
    if head in offline.NUMBER_WORDS:
        return offline.NUMBER_WORDS.index(head), color, offline.singular(label)
    return None


def offline_respond(messages: Sequence[dict], temperature: float) -> str:
    """Rewrites the annotation's "a red chair, two lamps and a bed" phrases into short QA."""
    system, user = messages[0]["content"], messages[-1]["content"]
    pair = next(k for k, p in SYSTEM_PROMPTS.items() if p == system)
    prompt = re.search(r"^Question: (.*)$", user, re.MULTILINE).group(1)
    text = re.search(r"^Annotation: (.*)$", user, re.MULTILINE).group(1)
    colors = offline.DEFAULT_COLORS
    rng = np.random.default_rng([int(round(temperature * 100)), zlib.crc32(user.encode())])
    items = []
    if pair == ("dense_caption", "qa"):
        boxes = re.findall(r"<box>.*?</box>", prompt)
        head = re.split(r" (?:on|next to) the ", text.rstrip("."))[0]
        parsed = _phrase(head, colors)
        if boxes and parsed:
            _, color, label = parsed
            items.append({"question": f"What is the object at {boxes[0]}?", "answer": label})
            if color:
                items.append(
                    {"question": f"What color is the object at {boxes[0]}?", "answer": color}
                )
        return json.dumps({"items": items})
    body = re.sub(r"^(a room with|there is|there are)\s+", "", text.rstrip("."))
    phrases = [p for p in (_phrase(x, colors) for x in re.split(r", | and ", body)) if p]
    labels = [label for _, _, label in phrases]
    for count, color, label in phrases:
        if count is not None:
            items.append(
                {
                    "question": f"How many {offline.plural(label)} are there?",
                    "answer": offline.number_word(count),
                }
            )
            continue
        items.append({"question": f"Is there {offline.article(label)}?", "answer": "yes"})
        if color and labels.count(label) == 1:
            items.append({"question": f"What color is the {label}?", "answer": color})
    return json.dumps({"items": offline.sample(rng, items, 4)})
