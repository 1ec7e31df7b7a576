"""Offline grounded generator: language records that are true of a scene by construction.

Everything is computed from the objects' labels, colours and boxes (metres, z up) and the room's
floor rectangle. Answers are short and use one phrasing per question type (QA answers are 1-3
words, as in ScanQA), so a tiny model can learn them; most questions can only be answered by
looking at the scene (counts, colours, existence, relations, boxes), and yes/no answers are
balanced per scene. The same (scene, seed) always gives the same records.

Spatial predicates (the tests check answers against these definitions, computed independently):
- `on`: a rests on b when |a.zmin - b.zmax| <= 0.05 m and a's xy centre lies in b's footprint.
- `near`: the object with the smallest box-to-box distance, at least 0.3 m closer than the next.
- `left/right` seen standing at A facing B: the sign of cross(B - A, C - A) in the xy plane
  (positive = left, z up), asked only when C is at least 0.3 m off the line of sight.
- `between A and B`: C's xy centre projects onto segment AB at 0.2 <= t <= 0.8 and lies within
  0.5 m of it; "no" answers are used only when t < -0.1 or t > 1.1 or the distance exceeds 1.2 m.
- `bigger`: box volume ratio >= 2; `taller`: box heights differ by >= 0.2 m.
Objects are named by their label when it is unique in the scene, else by "colour label" when
that is unique; other objects are never the subject of a referring question.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass

import numpy as np

from data_pipeline.language.records import format_box, format_point, make_record
from data_pipeline.scenes import synthetic
from llm3d_jax.datasets import OBJECT_CAPTION_PROMPT

# Labels that existence questions ask about when absent (plus every label of the scene), and the
# colour names that colour-existence questions draw their "no" answers from.
DEFAULT_VOCABULARY = tuple(synthetic.CATEGORIES)
DEFAULT_COLORS = tuple(synthetic.COLORS)
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
PICKABLE = {"ball", "box", "plant", "lamp", "book", "cup", "bottle", "pillow", "bag", "toy"}
SURFACES = {"table", "desk", "shelf", "cabinet", "bed", "sofa", "counter", "nightstand", "dresser"}
# affordance question -> the categories that afford it
AFFORDANCES = {
    "Where can I sit?": ("chair", "sofa", "bed", "bench", "stool", "armchair"),
    "Where can I sleep?": ("bed", "sofa"),
    "Where can I store my things?": ("cabinet", "shelf", "box", "dresser", "wardrobe"),
    "Where can I put a cup?": ("table", "desk", "cabinet", "shelf", "nightstand", "counter"),
    "What can I use to light the room?": ("lamp",),
    "What can I play with?": ("ball",),
}

ON_TOLERANCE = 0.05
NEAR_MARGIN = 0.3
SIDE_MARGIN = 0.3
BIGGER_RATIO = 2.0
TALLER_MARGIN = 0.2
NAV_CELL = 0.1
NAV_CLEARANCE = 0.25
WALL_MARGIN = 0.3


@dataclass(frozen=True)
class Obj:
    """What the generator needs of an object: id, label, colour name ("" unknown), AABB [6]."""

    id: int
    label: str
    color: str
    box: np.ndarray


@dataclass(frozen=True)
class Room:
    """The floor rectangle in metres (outer bounds of the room mesh), the floor height and the
    floor / wall colour names ("" unknown: only synthetic rooms record them)."""

    x0: float
    y0: float
    x1: float
    y1: float
    floor_z: float
    floor_color: str = ""
    wall_color: str = ""


def objects_of(scene) -> list[Obj]:
    """The scene's objects (`data_pipeline.scenes.SceneObject`-like) as `Obj`, sorted by id."""
    return sorted(
        (
            Obj(
                int(o.id),
                str(o.label),
                str(getattr(o, "color", "") or ""),
                np.asarray(o.box, np.float64),
            )
            for o in scene.objects
        ),
        key=lambda o: o.id,
    )


def room_of(scene) -> Room:
    """The floor rectangle: `meta["room"]` when known, else the mesh bounds, else objects + 1 m."""
    meta = getattr(scene, "meta", {})
    room = meta.get("room")
    if room is not None and len(room) == 6:
        return Room(
            float(room[0]),
            float(room[1]),
            float(room[3]),
            float(room[4]),
            float(room[2]),
            str(meta.get("floor_color", "")),
            str(meta.get("wall_color", "")),
        )
    vertices = np.asarray(getattr(scene, "vertices", np.zeros((0, 3))), np.float64).reshape(-1, 3)
    if len(vertices):
        lo, hi = vertices.min(0), vertices.max(0)
        return Room(lo[0], lo[1], hi[0], hi[1], lo[2])
    boxes = np.asarray([o.box for o in scene.objects], np.float64).reshape(-1, 6)
    lo, hi = boxes[:, :3].min(0) - 1.0, boxes[:, 3:].max(0) + 1.0
    return Room(lo[0], lo[1], hi[0], hi[1], boxes[:, 2].min())


# ---------------------------------------------------------------------------------- geometry


def centre(box: np.ndarray) -> np.ndarray:
    return (box[:3] + box[3:]) / 2


def volume(box: np.ndarray) -> float:
    return float(np.prod(np.maximum(box[3:] - box[:3], 0)))


def height(box: np.ndarray) -> float:
    return float(box[5] - box[2])


def box_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two AABBs (0 when they touch or overlap)."""
    d = np.maximum(0.0, np.maximum(a[:3] - b[3:], b[:3] - a[3:]))
    return float(np.linalg.norm(d))


def rests_on(a: np.ndarray, b: np.ndarray) -> bool:
    c = centre(a)
    return abs(a[2] - b[5]) <= ON_TOLERANCE and b[0] <= c[0] <= b[3] and b[1] <= c[1] <= b[4]


def _xy_centre(box) -> tuple[float, float]:
    return (float(box[0]) + float(box[3])) / 2, (float(box[1]) + float(box[4])) / 2


def side_offset(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Signed distance (m) of c from the line a->b in the xy plane; positive = left of a facing b."""
    (ax, ay), (bx, by), (cx, cy) = _xy_centre(a), _xy_centre(b), _xy_centre(c)
    fx, fy = bx - ax, by - ay
    n = math.hypot(fx, fy)
    if n < 1e-6:
        return 0.0
    return (fx * (cy - ay) - fy * (cx - ax)) / n


def segment_position(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """(t, distance): projection parameter of c's xy centre on segment a->b and its distance."""
    (ax, ay), (bx, by), (cx, cy) = _xy_centre(a), _xy_centre(b), _xy_centre(c)
    fx, fy = bx - ax, by - ay
    t = ((cx - ax) * fx + (cy - ay) * fy) / max(fx * fx + fy * fy, 1e-9)
    k = min(max(t, 0.0), 1.0)
    return t, math.hypot(cx - (ax + k * fx), cy - (ay + k * fy))


def is_between(a, b, c) -> bool:
    return _strictly_between(*segment_position(a, b, c))


def clearly_not_between(a, b, c) -> bool:
    return _clearly_not_between(*segment_position(a, b, c))


def _strictly_between(t: float, d: float) -> bool:
    return 0.2 <= t <= 0.8 and d <= 0.5


def _clearly_not_between(t: float, d: float) -> bool:
    return t < -0.1 or t > 1.1 or d > 1.2


# ---------------------------------------------------------------------------------- words


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(label: str) -> str:
    if label.endswith(("s", "x", "ch", "sh")):
        return label + "es"
    if label.endswith("f"):
        return label[:-1] + "ves"
    if label.endswith("y") and label[-2:-1] not in "aeiou":
        return label[:-1] + "ies"
    return label + "s"


def singular(phrase: str, labels=()) -> str:
    """The label whose plural is `phrase`: one of `labels` when given, else undoing `plural`."""
    for label in labels:
        if plural(label) == phrase:
            return label
    for cut, tail in ((3, "f"), (3, "y"), (2, ""), (1, "")):
        if len(phrase) > cut and plural(phrase[:-cut] + tail) == phrase:
            return phrase[:-cut] + tail
    return phrase


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def join_words(items: list[str], conj: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def referring_names(objects: list[Obj]) -> dict[int, str]:
    """id -> "label" when the label is unique, "colour label" when that pair is unique."""
    labels = [o.label for o in objects]
    pairs = [(o.color, o.label) for o in objects]
    names = {}
    for o in objects:
        if labels.count(o.label) == 1:
            names[o.id] = o.label
        elif o.color and pairs.count((o.color, o.label)) == 1:
            names[o.id] = f"{o.color} {o.label}"
    return names


def inventory(objects: list[Obj]) -> str:
    """ "two chairs, a red table and a lamp": every category with its count (colour when single)."""
    items = []
    for label in sorted({o.label for o in objects}):
        same = [o for o in objects if o.label == label]
        if len(same) == 1:
            items.append(article(f"{same[0].color} {label}".strip()))
        else:
            items.append(f"{number_word(len(same))} {plural(label)}")
    return join_words(items)


# ---------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Facts:
    scene_id: str
    objects: list[Obj]
    names: dict[int, str]
    room: Room
    vocabulary: tuple[str, ...]
    colors: tuple[str, ...]


def scene_rng(seed: int, scene_id: str, salt: str = "") -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{scene_id}/{salt}".encode())])


def sample(rng: np.random.Generator, items: list, k: int) -> list:
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), k, replace=False))]


def _balanced(rng, yes: list, no: list, cap: int) -> list:
    """Equal numbers of yes and no items (at most `cap` each)."""
    k = min(len(yes), len(no), cap)
    return sample(rng, yes, k) + sample(rng, no, k)


def _nearest(facts: Facts, o: Obj) -> tuple[Obj | None, float]:
    others = sorted(
        ((box_distance(o.box, p.box), p.id, p) for p in facts.objects if p.id != o.id),
        key=lambda x: (x[0], x[1]),
    )
    if not others:
        return None, float("inf")
    return others[0][2], others[0][0]


def _name_or_label(facts: Facts, o: Obj) -> str:
    return facts.names.get(o.id, o.label)


# ---------------------------------------------------------------------------------- tasks
# Each returns a list of (prompt, answer, object_ids, qtype); object_ids in the order the prompt
# names the objects, then the answer's (what LLM3DConfig.object_roles learns roles from).


def captions(facts: Facts, rng) -> list:
    answer = f"a room with {inventory(facts.objects)}."
    ids = [o.id for o in facts.objects]
    return [
        ("Describe the room.", answer, ids, "caption"),
        ("What is in this room?", answer, ids, "caption"),
    ]


def object_captions(facts: Facts, rng) -> list:
    """The one object of an object-level scene, asked the way the release asks about Objaverse."""
    return [
        (OBJECT_CAPTION_PROMPT, article(f"{o.color} {o.label}".strip()) + ".", [o.id], "object")
        for o in facts.objects[:1]
    ]


def dense_caption_text(facts: Facts, o: Obj) -> str:
    text = article(f"{o.color} {o.label}".strip())
    bases = [p for p in facts.objects if p.id != o.id and rests_on(o.box, p.box)]
    if bases:
        return f"{text} on the {bases[0].label}."
    near, dist = _nearest(facts, o)
    if near is not None and dist <= 0.5:
        return f"{text} next to the {near.label}."
    return text + "."


def dense_captions(facts: Facts, rng) -> list:
    return [
        (
            f"Describe the object at {format_box(o.box)}.",
            dense_caption_text(facts, o),
            [o.id],
            "dense",
        )
        for o in facts.objects
    ]


def _qa_existence(facts: Facts, rng) -> list:
    present = sorted({o.label for o in facts.objects})
    absent = [v for v in facts.vocabulary if v not in present]
    yes = [
        (
            f"Is there {article(v)} in the room?",
            "yes",
            [o.id for o in facts.objects if o.label == v],
        )
        for v in present
    ]
    no = [(f"Is there {article(v)} in the room?", "no", []) for v in absent]
    out = [(p, a, i, "exist") for p, a, i in _balanced(rng, yes, no, 4)]
    pairs = sorted({(o.color, o.label) for o in facts.objects if o.color})
    yes = [
        (
            f"Is there {article(c + ' ' + lab)}?",
            "yes",
            [o.id for o in facts.objects if (o.color, o.label) == (c, lab)],
        )
        for c, lab in pairs
    ]
    no = [
        (f"Is there {article(c + ' ' + lab)}?", "no", [])
        for lab in sorted({lab for _, lab in pairs})
        for c in facts.colors
        if (c, lab) not in pairs
    ]
    out += [(p, a, i, "exist_color") for p, a, i in _balanced(rng, yes, no, 4)]
    return out


def _qa_counting(facts: Facts, rng) -> list:
    out = []
    labels = sorted({o.label for o in facts.objects})
    for lab in labels:
        same = [o for o in facts.objects if o.label == lab]
        out.append(
            (
                f"How many {plural(lab)} are there?",
                number_word(len(same)),
                [o.id for o in same],
                "count",
            )
        )
        if len(same) > 1:
            for c in sorted({o.color for o in same if o.color}):
                sub = [o for o in same if o.color == c]
                out.append(
                    (
                        f"How many {c} {plural(lab)} are there?",
                        number_word(len(sub)),
                        [o.id for o in sub],
                        "count_color",
                    )
                )
    absent = [v for v in facts.vocabulary if v not in labels]
    for v in sample(rng, absent, 1):
        out.append((f"How many {plural(v)} are there?", "zero", [], "count"))
    return out


def _qa_color(facts: Facts, rng) -> list:
    return [
        (f"What color is the {o.label}?", o.color, [o.id], "color")
        for o in facts.objects
        if o.color and facts.names.get(o.id) == o.label
    ]


def _qa_on(facts: Facts, rng) -> list:
    out, yes, no = [], [], []
    named = [o for o in facts.objects if o.id in facts.names]
    for b in named:
        tops = [a for a in facts.objects if a.id != b.id and rests_on(a.box, b.box)]
        top_labels = sorted({a.label for a in tops})
        if 1 <= len(top_labels) <= 2 and all(" " not in lab for lab in top_labels):  # 1-3 words
            answer = join_words(top_labels)
            out.append(
                (
                    f"What is on the {facts.names[b.id]}?",
                    answer,
                    [b.id] + [a.id for a in tops],
                    "on",
                )
            )
    for a in named:
        for b in named:
            if a.id == b.id:
                continue
            q = f"Is the {facts.names[a.id]} on the {facts.names[b.id]}?"
            if rests_on(a.box, b.box):
                yes.append((q, "yes", [a.id, b.id]))
            elif (
                not b.box[0] <= centre(a.box)[0] <= b.box[3]
                or not b.box[1] <= centre(a.box)[1] <= b.box[4]
            ):
                no.append((q, "no", [a.id, b.id]))
    return out + [(p, a, i, "on_yn") for p, a, i in _balanced(rng, yes, no, 2)]


def _qa_size(facts: Facts, rng) -> list:
    named = [o for o in facts.objects if o.id in facts.names]
    bigger, taller_yes, taller_no = [], [], []
    for i, a in enumerate(named):
        for b in named[i + 1 :]:
            va, vb = volume(a.box), volume(b.box)
            if max(va, vb) >= BIGGER_RATIO * max(min(va, vb), 1e-9):
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                big = a if va > vb else b
                q = f"Which is bigger, the {facts.names[first.id]} or the {facts.names[second.id]}?"
                bigger.append((q, facts.names[big.id], [first.id, second.id], "bigger"))
            if abs(height(a.box) - height(b.box)) >= TALLER_MARGIN:
                x, y = (a, b) if rng.random() < 0.5 else (b, a)
                q = f"Is the {facts.names[x.id]} taller than the {facts.names[y.id]}?"
                if height(x.box) > height(y.box):
                    taller_yes.append((q, "yes", [x.id, y.id]))
                else:
                    taller_no.append((q, "no", [x.id, y.id]))
    taller = _balanced(rng, taller_yes, taller_no, 2)
    return sample(rng, bigger, 3) + [(p, a, i, "taller") for p, a, i in taller]


def _qa_side(facts: Facts, rng) -> list:
    named = [o for o in facts.objects if o.id in facts.names]
    left, right = [], []
    for a in named:
        for b in named:
            if a.id == b.id or np.linalg.norm(centre(a.box)[:2] - centre(b.box)[:2]) < 1.0:
                continue
            for c in named:
                if c.id in (a.id, b.id):
                    continue
                s = side_offset(a.box, b.box, c.box)
                if abs(s) < SIDE_MARGIN:
                    continue
                q = (
                    f"Standing at the {facts.names[a.id]} facing the {facts.names[b.id]}, "
                    f"is the {facts.names[c.id]} on your left or right?"
                )
                (left if s > 0 else right).append(
                    (q, "left" if s > 0 else "right", [a.id, b.id, c.id], "side")
                )
    return _balanced(rng, left, right, 2)


def _qa_near(facts: Facts, rng) -> list:
    out = []
    for a in facts.objects:
        if a.id not in facts.names or len(facts.objects) < 3:
            continue
        ranked = sorted((box_distance(a.box, p.box), p.id) for p in facts.objects if p.id != a.id)
        if ranked[1][0] - ranked[0][0] < NEAR_MARGIN:
            continue
        near = next(p for p in facts.objects if p.id == ranked[0][1])
        q = f"What is closest to the {facts.names[a.id]}?"
        out.append((q, _name_or_label(facts, near), [a.id, near.id], "near"))
    return sample(rng, out, 3)


def _qa_between(facts: Facts, rng) -> list:
    named = [o for o in facts.objects if o.id in facts.names]
    which, yes, no = [], [], []
    for i, a in enumerate(named):
        for b in named[i + 1 :]:
            others = [
                (c, segment_position(a.box, b.box, c.box))
                for c in facts.objects
                if c.id not in (a.id, b.id)
            ]
            strict = [c for c, td in others if _strictly_between(*td)]
            loose = [c for c, td in others if not _clearly_not_between(*td)]
            pair = f"the {facts.names[a.id]} and the {facts.names[b.id]}"
            if len(strict) == 1 and len(loose) == 1:
                c = strict[0]
                which.append(
                    (
                        f"What is between {pair}?",
                        _name_or_label(facts, c),
                        [a.id, b.id, c.id],
                        "between",
                    )
                )
            for c, td in others:
                if c.id not in facts.names:
                    continue
                q = f"Is the {facts.names[c.id]} between {pair}?"
                if _strictly_between(*td):
                    yes.append((q, "yes", [c.id, a.id, b.id], "between_yn"))
                elif _clearly_not_between(*td):
                    no.append((q, "no", [c.id, a.id, b.id], "between_yn"))
    return sample(rng, which, 2) + _balanced(rng, yes, no, 2)


def _qa_room(facts: Facts, rng) -> list:
    """Questions about the room as a whole (ScanQA asks these too): floor and wall colour, when
    the scene records them, and how many objects it holds."""
    out = [
        (
            "How many objects are in the room?",
            number_word(len(facts.objects)),
            [o.id for o in facts.objects],
            "count_all",
        )
    ]
    if facts.room.floor_color:
        out.append(("What color is the floor?", facts.room.floor_color, [], "floor_color"))
    if facts.room.wall_color:
        out.append(("What color are the walls?", facts.room.wall_color, [], "wall_color"))
    return out


def questions(facts: Facts, rng) -> list:
    items = []
    for part in (
        _qa_existence,
        _qa_counting,
        _qa_color,
        _qa_on,
        _qa_size,
        _qa_side,
        _qa_near,
        _qa_between,
        _qa_room,
    ):
        items += part(facts, rng)
    return items


GROUNDING_FORMS = (
    "Where is the {}?",
    "Find the {}.",
    "Locate the {}.",
    "Show me the {}.",
    "Where can I find the {}?",
    "Point out the {}.",
)


def referring_expressions(facts: Facts, o: Obj) -> list[tuple[str, str]]:
    """(phrase, qtype) pairs that pick out `o` alone: its name, its colour and category when that
    pair is unique, and for a category with several objects the biggest / smallest one and the one
    closest to each named object of another category."""
    out = []
    if o.id in facts.names:
        out.append((facts.names[o.id], "ground"))
    pairs = [(p.color, p.label) for p in facts.objects]
    if o.color and pairs.count((o.color, o.label)) == 1 and facts.names.get(o.id) == o.label:
        out.append((f"{o.color} {o.label}", "ground_color"))
    same = [p for p in facts.objects if p.label == o.label]
    if len(same) < 2:
        return out
    volumes = sorted(volume(p.box) for p in same)
    if volume(o.box) == volumes[-1] and volumes[-1] > 1.2 * volumes[-2]:
        out.append((f"biggest {o.label}", "ground_size"))
    if volume(o.box) == volumes[0] and volumes[1] > 1.2 * volumes[0]:
        out.append((f"smallest {o.label}", "ground_size"))
    for ref in facts.objects:
        if ref.label == o.label or ref.id not in facts.names:
            continue
        gaps = sorted(box_distance(p.box, ref.box) for p in same)
        # closest by a clear margin, so the answer does not hang on a centimetre
        if box_distance(o.box, ref.box) == gaps[0] and gaps[1] - gaps[0] > 0.3:
            out.append((f"{o.label} closest to the {facts.names[ref.id]}", "ground_relation"))
    return out


def grounding(facts: Facts, rng) -> list:
    """Two phrasings of each referring expression of every object (`referring_expressions`),
    at most two relational expressions per object."""
    out = []
    for o in facts.objects:
        expressions = referring_expressions(facts, o)
        relational = [e for e in expressions if e[1] == "ground_relation"]
        expressions = [e for e in expressions if e[1] != "ground_relation"]
        expressions += sample(rng, relational, 2)
        for phrase, qtype in expressions:
            for k in rng.choice(len(GROUNDING_FORMS), 2, replace=False):
                prompt = GROUNDING_FORMS[int(k)].format(phrase)
                out.append((prompt, format_box(o.box), [o.id], qtype))
    return out


def decompositions(facts: Facts, rng) -> list:
    out = []
    named = [o for o in facts.objects if o.id in facts.names]
    for p in named:
        if p.label not in PICKABLE:
            continue
        base = next((b for b in facts.objects if b.id != p.id and rests_on(p.box, b.box)), None)
        for s in named:
            if s.id == p.id or s.label not in SURFACES or (base is not None and base.id == s.id):
                continue
            pn, sn = facts.names[p.id], facts.names[s.id]
            first = (
                f"1. go to the {base.label}. 2. pick up the {pn} from the {base.label}."
                if base
                else f"1. go to the {pn}. 2. pick up the {pn}."
            )
            steps = f"{first} 3. go to the {sn}. 4. put the {pn} on the {sn}."
            ids = [p.id, s.id] + ([base.id] if base else [])
            out.append((f"How do I put the {pn} on the {sn}?", steps, ids, "put"))
    for o in named:
        if o.label == "lamp":
            out.append(
                (
                    "How do I turn on the light?",
                    f"1. go to the {facts.names[o.id]}. 2. switch on the {facts.names[o.id]}.",
                    [o.id],
                    "light",
                )
            )
        if o.label == "plant":
            out.append(
                (
                    "How do I water the plant?",
                    f"1. get a cup of water. 2. go to the {facts.names[o.id]}. 3. water the {facts.names[o.id]}.",
                    [o.id],
                    "water",
                )
            )
    return sample(rng, out, 4)


def affordances(facts: Facts, rng) -> list:
    out = []
    for question, categories in AFFORDANCES.items():
        present = sorted({o.label for o in facts.objects if o.label in categories})
        if present:
            ids = [o.id for o in facts.objects if o.label in categories]
            out.append(
                (question, join_words([f"the {lab}" for lab in present], "or"), ids, "afford")
            )
    return out


def dialogues(facts: Facts, rng) -> list:
    """Two-turn conversations; the prompt is the history ("Human: ..\\nRobot: ..\\nHuman: ..")."""
    out = []
    first_q, first_a = "Human: What is in this room?", f"there is {inventory(facts.objects)}."
    ids = [o.id for o in facts.objects]
    out.append((first_q, first_a, ids, "dialogue"))
    history = f"{first_q}\nRobot: {first_a}\n"
    follow = []
    for lab in sorted({o.label for o in facts.objects}):
        n = sum(o.label == lab for o in facts.objects)
        follow.append(
            (
                f"Human: How many {plural(lab)} are there?",
                f"there {'is' if n == 1 else 'are'} {number_word(n)}.",
                [o.id for o in facts.objects if o.label == lab],
            )
        )
    for o in facts.objects:
        if o.color and facts.names.get(o.id) == o.label:
            follow.append((f"Human: What color is the {o.label}?", f"it is {o.color}.", [o.id]))
    for q, a, i in sample(rng, follow, 2):
        out.append((history + q, a, i, "dialogue"))
    seats = [
        o
        for o in facts.objects
        if o.label in AFFORDANCES["Where can I sit?"] and o.id in facts.names
    ]
    if seats:
        seat = seats[int(rng.integers(len(seats)))]
        q1 = "Human: I am tired. Where can I sit?"
        a1 = f"you can sit on the {facts.names[seat.id]}."
        out.append((q1, a1, [seat.id], "dialogue"))
        out.append(
            (
                f"{q1}\nRobot: {a1}\nHuman: Where is it?",
                f"it is here: {format_box(seat.box)}",
                [seat.id],
                "dialogue",
            )
        )
    return out


def navigation(facts: Facts, rng) -> list:
    named = [
        o for o in facts.objects if o.id in facts.names and o.box[2] <= facts.room.floor_z + 0.3
    ]
    pairs = [
        (a, b)
        for a in named
        for b in named
        if a.id != b.id and np.linalg.norm(centre(a.box)[:2] - centre(b.box)[:2]) >= 1.5
    ]
    out = []
    for a, b in sample(rng, pairs, 3):
        path = plan_path(facts, a, b)
        if path is None:
            continue
        answer = " ".join(format_point([x, y, facts.room.floor_z]) for x, y in path)
        q = f"I am at the {facts.names[a.id]}. How do I walk to the {facts.names[b.id]}?"
        out.append((q, answer, [a.id, b.id], "navigate"))
    return out


TASK_BUILDERS = {
    "caption": captions,
    "dense_caption": dense_captions,
    "qa": questions,
    "grounding": grounding,
    "task_decomposition": decompositions,
    "dialogue": dialogues,
    "navigation": navigation,
    "affordance": affordances,
    "object_caption": object_captions,
}
# Tasks of a scene file that holds one object (meta "level": "object"); the others are a room's.
OBJECT_TASKS = ("object_caption",)


# ---------------------------------------------------------------------------------- navigation


def _free_grid(facts: Facts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(free bool [nx,ny], cell centres x [nx], y [ny]): floor cells clear of floor objects."""
    r = facts.room
    xs = np.arange(r.x0 + WALL_MARGIN + NAV_CELL / 2, r.x1 - WALL_MARGIN, NAV_CELL)
    ys = np.arange(r.y0 + WALL_MARGIN + NAV_CELL / 2, r.y1 - WALL_MARGIN, NAV_CELL)
    free = np.ones((len(xs), len(ys)), bool)
    for o in facts.objects:
        if o.box[2] > r.floor_z + 0.3:  # not standing on the floor: sits on something that does
            continue
        bx = (xs >= o.box[0] - NAV_CLEARANCE) & (xs <= o.box[3] + NAV_CLEARANCE)
        by = (ys >= o.box[1] - NAV_CLEARANCE) & (ys <= o.box[4] + NAV_CLEARANCE)
        free[np.ix_(bx, by)] = False
    return free, xs, ys


def _nearest_free(free: np.ndarray, xs, ys, point) -> tuple[int, int] | None:
    ii, jj = np.nonzero(free)
    if not len(ii):
        return None
    d = (xs[ii] - point[0]) ** 2 + (ys[jj] - point[1]) ** 2
    k = int(np.argmin(d))
    return int(ii[k]), int(jj[k])


def _line_free(free, xs, ys, p, q) -> bool:
    """Whether every grid cell under the straight segment p -> q (sampled every 2.5 cm) is free."""
    n = max(2, int(np.ceil(np.hypot(q[0] - p[0], q[1] - p[1]) / (NAV_CELL / 4))) + 1)
    t = np.linspace(0, 1, n)
    i = np.clip(np.round((p[0] + t * (q[0] - p[0]) - xs[0]) / NAV_CELL), 0, len(xs) - 1).astype(int)
    j = np.clip(np.round((p[1] + t * (q[1] - p[1]) - ys[0]) / NAV_CELL), 0, len(ys) - 1).astype(int)
    return bool(free[i, j].all())


def plan_path(facts: Facts, a: Obj, b: Obj) -> list[tuple[float, float]] | None:
    """Floor waypoints (x, y) from beside `a` to beside `b` avoiding floor objects, or None.

    A* on a 0.1 m grid whose blocked cells are the floor objects' footprints grown by 0.25 m,
    then shortened to the waypoints where the straight line of sight breaks.
    """
    free, xs, ys = _free_grid(facts)
    if free.size == 0:
        return None
    start = _nearest_free(free, xs, ys, centre(a.box))
    goal = _nearest_free(free, xs, ys, centre(b.box))
    if start is None or goal is None:
        return None
    steps = [(di, dj, math.hypot(di, dj)) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj]
    grid, nx, ny = free.tolist(), free.shape[0], free.shape[1]
    best = {start: 0.0}
    parent = {start: None}
    heap = [(0.0, start)]
    while heap:
        _, cell = heapq.heappop(heap)
        if cell == goal:
            break
        ci, cj = cell
        for di, dj, step in steps:
            ni, nj = ci + di, cj + dj
            if not (0 <= ni < nx and 0 <= nj < ny) or not grid[ni][nj]:
                continue
            if di and dj and not (grid[ni][cj] and grid[ci][nj]):
                continue  # no corner cutting
            cost = best[cell] + step
            if cost < best.get((ni, nj), math.inf):
                best[(ni, nj)], parent[(ni, nj)] = cost, cell
                heapq.heappush(heap, (cost + math.hypot(goal[0] - ni, goal[1] - nj), (ni, nj)))
    if goal not in parent:
        return None
    cells = [goal]
    while parent[cells[-1]] is not None:
        cells.append(parent[cells[-1]])
    points = [(float(xs[i]), float(ys[j])) for i, j in reversed(cells)]
    path = [points[0]]
    k = 0
    while k < len(points) - 1:
        nxt = next(
            m
            for m in range(len(points) - 1, k, -1)
            if m == k + 1 or _line_free(free, xs, ys, points[k], points[m])
        )
        path.append(points[nxt])
        k = nxt
    return path


# ---------------------------------------------------------------------------------- entry


def facts_for(
    scene_id: str,
    objects: list[Obj],
    room: Room,
    vocabulary=DEFAULT_VOCABULARY,
    colors=DEFAULT_COLORS,
) -> Facts:
    scene_colors = sorted({o.color for o in objects if o.color})
    return Facts(
        scene_id=scene_id,
        objects=objects,
        names=referring_names(objects),
        room=room,
        vocabulary=tuple(dict.fromkeys(list(vocabulary) + sorted({o.label for o in objects}))),
        colors=tuple(dict.fromkeys(list(colors) + scene_colors)),
    )


def generate(
    scene,
    seed: int = 0,
    tasks=tuple(TASK_BUILDERS),
    vocabulary=DEFAULT_VOCABULARY,
    colors=DEFAULT_COLORS,
) -> list[dict]:
    """Records (source "template") for every task in `tasks`, true of `scene` by construction.
    An object-level scene (meta "level": "object") gets only the `OBJECT_TASKS`, a room none."""
    facts = facts_for(scene.scene_id, objects_of(scene), room_of(scene), vocabulary, colors)
    object_level = getattr(scene, "meta", {}).get("level") == "object"
    records = []
    for task in tasks:
        if (task in OBJECT_TASKS) != object_level:
            continue
        rng = scene_rng(seed, facts.scene_id, task)
        for prompt, answer, ids, qtype in TASK_BUILDERS[task](facts, rng):
            meta = {"qtype": qtype}
            records.append(
                make_record(facts.scene_id, task, prompt, [answer], ids, "template", meta)
            )
    return records
