"""A built-in image-grounded benchmark: coloured shapes, questions only the image answers.

``make_synth`` renders 224x224 images with Pillow (1-4 big shapes of different kinds:
circle, square, triangle, star; six colours far apart in RGB; light plain, gradient,
speckled or blotchy backgrounds) and asks multiple-choice questions about them:

========  ===========================================  =======
category  question                                     options
========  ===========================================  =======
color     What color is the circle?                    2-4 colours
shape     Which shape is red?                          2-4 shapes
exists    Is there a red circle?                       yes / no
position  Which shape is farthest left?                the shapes shown
count     How many shapes are there?                   2-4 of 1..4
========  ===========================================  =======

Text alone cannot answer: the asked-for value is drawn uniformly, the distractors
symmetrically, and the answer's position is balanced, so for any question and option
list every option is equally likely (``text_baseline`` measures it). Each explanation
(``solution``) first describes the picture, then states the fact asked for ("A red star on the
left and a blue circle at the top right. The star is red."): trained on the EA formats, a model
reads the image out before it answers. It writes the
ScienceQA layout (``problems.json``, ``pid_splits.json``, ``captions.json``,
``images/<split>/<qid>/image.png``) and ``captions_llava.json`` (CC595K form, the train
images) for stage-1 alignment. The same arguments give the same bytes.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

GENERATOR_VERSION = 2  # 2: each solution first describes the scene
_SCENE_STREAM = 1  # in the random streams' names: the scenes and questions are those of version 1
IMAGE_SIZE = 224
COLORS = {  # far apart in RGB: the smallest pairwise distance is above 140
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (30, 80, 230),
    "yellow": (245, 210, 0),
    "purple": (170, 40, 200),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
DEFAULT_MIX = {"color": 0.5, "shape": 0.15, "exists": 0.15, "position": 0.1, "count": 0.1}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_INFO = {  # category -> (task, grade, topic, skill)
    "color": ("closed choice", "grade1", "colors", "Name the color of a shape"),
    "shape": ("closed choice", "grade1", "shapes", "Find the shape that has a given color"),
    "exists": ("yes or no", "grade2", "existence", "Tell whether a shape is in the picture"),
    "position": ("closed choice", "grade3", "spatial-relations", "Find the shape farthest in a direction"),
    "count": ("closed choice", "grade2", "counting", "Count the shapes"),
}
_DIRECTIONS = {  # direction -> (question, axis, sign): the answer maximises sign * coordinate
    "left": ("Which shape is farthest left?", 0, -1),
    "right": ("Which shape is farthest right?", 0, 1),
    "top": ("Which shape is highest?", 1, -1),
    "bottom": ("Which shape is lowest?", 1, 1),
}
CAPTION_PROMPTS = (  # CC595K-style requests for a brief description
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Give a short description of this picture.",
    "What is shown in this image? Answer briefly.",
    "Write a short caption for the image.",
)


# -- scenes ------------------------------------------------------------------------------

def _place(rng: random.Random, n: int, size: int) -> list[tuple[int, int, int]]:
    """``n`` non-overlapping (x, y, r) discs inside the canvas; radii shrink with ``n``."""
    lo, hi = {1: (34, 50), 2: (30, 46), 3: (26, 40), 4: (24, 36)}[n]
    scale = size / IMAGE_SIZE
    for _ in range(1000):
        discs: list[tuple[int, int, int]] = []
        for _ in range(n):
            r = round(rng.randint(lo, hi) * scale)
            for _ in range(100):
                x, y = rng.randint(r + 4, size - r - 4), rng.randint(r + 4, size - r - 4)
                if all(math.hypot(x - a, y - b) >= 1.2 * (r + c) + 4 for a, b, c in discs):
                    discs.append((x, y, r))
                    break
            else:
                break
        if len(discs) == n:
            return discs
    raise RuntimeError("could not place the shapes")  # pragma: no cover - radii are small enough


def _background(rng: random.Random) -> dict:
    kind = rng.choice(("plain", "gradient", "speckled", "blotchy"))
    base = rng.randint(200, 245)
    c1 = [max(0, min(255, base + rng.randint(-12, 12))) for _ in range(3)]
    bg = {"kind": kind, "color": c1}
    if kind == "gradient":
        base2 = rng.randint(175, 250)
        bg["color2"] = [max(0, min(255, base2 + rng.randint(-12, 12))) for _ in range(3)]
        bg["direction"] = rng.choice(("horizontal", "vertical", "diagonal"))
    elif kind in ("speckled", "blotchy"):
        bg["amplitude"] = rng.randint(6, 14) if kind == "speckled" else rng.randint(10, 22)
        bg["noise_seed"] = rng.getrandbits(32)
    return bg


def _scene(rng: random.Random, kinds: Sequence[str], colors: Sequence[str], size: int,
           order_margin: Optional[tuple[int, int]] = None) -> dict:
    """Shapes of ``kinds``/``colors`` at random places; ``order_margin=(axis, px)`` keeps the
    two most extreme shapes on both ends of that axis at least ``px`` apart."""
    for _ in range(1000):
        discs = _place(rng, len(kinds), size)
        if order_margin and len(discs) > 1:
            axis, px = order_margin
            coords = sorted(d[axis] for d in discs)
            if coords[1] - coords[0] < px or coords[-1] - coords[-2] < px:
                continue
        break
    shapes = [{"shape": k, "color": c, "x": x, "y": y, "r": r} for k, c, (x, y, r) in zip(kinds, colors, discs)]
    return {"shapes": shapes, "background": _background(rng), "size": size}


class _Balancer:
    """Answer positions that cycle through shuffled blocks: exactly balanced per option count."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pending: dict[tuple[str, int], list[int]] = defaultdict(list)

    def position(self, category: str, n: int) -> int:
        queue = self.pending[(category, n)]
        if not queue:
            queue.extend(range(n))
            self.rng.shuffle(queue)
        return queue.pop()


def _options(rng: random.Random, balancer: _Balancer, category: str, answer: str, preferred: Sequence[str],
             pool: Sequence[str], n: int) -> tuple[list[str], int]:
    """``n`` options: the answer at a balanced position, distractors from ``preferred`` first."""
    return place_options(rng, answer, preferred, pool, n, lambda: balancer.position(category, n))


def place_options(rng: random.Random, answer: str, preferred: Sequence[str], pool: Sequence[str], n: int,
                  position) -> tuple[list[str], int]:
    """``n`` options: ``answer`` at ``position()`` (a balanced draw), distractors from ``preferred``
    first, then from ``pool``; returns (options, answer index)."""
    pref = [p for p in dict.fromkeys(preferred) if p != answer]
    rng.shuffle(pref)
    rest = [p for p in pool if p != answer and p not in pref]
    rng.shuffle(rest)
    distractors = (pref + rest)[: n - 1]
    rng.shuffle(distractors)
    pos = position()
    return distractors[:pos] + [answer] + distractors[pos:], pos


def _problem(rng: random.Random, balancer: _Balancer, category: str, size: int) -> dict:
    colors = list(COLORS)
    if category == "color":
        n = rng.choice((1, 2, 2, 3, 3, 4))
        kinds = rng.sample(SHAPES, n)
        cols = [rng.choice(colors) for _ in kinds]
        scene = _scene(rng, kinds, cols, size)
        target = 0  # kinds are in random order already
        shape, answer = kinds[target], cols[target]
        choices, index = _options(rng, balancer, category, answer, cols[1:], colors, rng.choice((2, 3, 4)))
        question, solution = f"What color is the {shape}?", f"The {shape} is {answer}."
    elif category == "shape":
        n = rng.choice((1, 2, 2, 3, 3, 4))
        kinds = rng.sample(SHAPES, n)
        color = rng.choice(colors)
        cols = [color] + [rng.choice([c for c in colors if c != color]) for _ in kinds[1:]]
        scene = _scene(rng, kinds, cols, size)
        answer = kinds[0]
        choices, index = _options(rng, balancer, category, answer, kinds[1:], SHAPES, rng.choice((2, 3, 4)))
        question, solution = f"Which shape is {color}?", f"The {color} shape is the {answer}."
    elif category == "exists":
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        present = rng.random() < 0.5
        n = rng.choice((1, 2, 3, 4))
        if present:
            kinds = [shape] + rng.sample([k for k in SHAPES if k != shape], n - 1)
            cols = [color] + [rng.choice(colors) for _ in kinds[1:]]
        else:
            kinds = rng.sample(SHAPES, n)
            cols = [rng.choice([c for c in colors if c != color]) if k == shape else rng.choice(colors)
                    for k in kinds]
        order = list(range(n))
        rng.shuffle(order)
        kinds, cols = [kinds[i] for i in order], [cols[i] for i in order]
        scene = _scene(rng, kinds, cols, size)
        answer = "yes" if present else "no"
        pos = balancer.position(category, 2)
        choices = [answer, "no" if present else "yes"] if pos == 0 else ["no" if present else "yes", answer]
        index = pos
        question = f"Is there a {color} {shape}?"
        solution = f"There is a {color} {shape}." if present else f"There is no {color} {shape}."
    elif category == "position":
        direction = rng.choice(tuple(_DIRECTIONS))
        text, axis, sign = _DIRECTIONS[direction]
        n = rng.choice((2, 3, 4))
        kinds = rng.sample(SHAPES, n)
        cols = [rng.choice(colors) for _ in kinds]
        scene = _scene(rng, kinds, cols, size, order_margin=(axis, round(28 * size / IMAGE_SIZE)))
        key = "xy"[axis]
        answer = max(scene["shapes"], key=lambda s: sign * s[key])["shape"]
        choices, index = _options(rng, balancer, category, answer, kinds, kinds, n)
        where = {"left": "farthest left", "right": "farthest right", "top": "highest", "bottom": "lowest"}[direction]
        question, solution = text, f"The {answer} is {where}."
    elif category == "count":
        n = rng.choice((1, 2, 3, 4))
        kinds = rng.sample(SHAPES, n)
        cols = [rng.choice(colors) for _ in kinds]
        scene = _scene(rng, kinds, cols, size)
        answer = str(n)
        choices, index = _options(rng, balancer, category, answer, [], [str(i) for i in COUNT_WORDS],
                                  rng.choice((2, 3, 4)))
        question = "How many shapes are there?"
        solution = "There is one shape." if n == 1 else f"There are {COUNT_WORDS[n]} shapes."
    else:
        raise ValueError(f"unknown question category {category!r}; valid: {', '.join(_INFO)}")
    task, grade, topic, skill = _INFO[category]
    # The explanation first says what the picture shows, then the fact the question needs: a
    # chain of thought grounded in the image ("A red star on the left and a blue circle at the
    # top right. The star is red."), which a model answering in the EA formats learns to produce.
    solution = f"{describe(scene)} {solution}"
    return {"question": question, "choices": choices, "answer": index, "hint": "", "image": "image.png",
            "task": task, "grade": grade, "subject": "natural science", "topic": topic, "category": category,
            "skill": skill, "lecture": "", "solution": solution, "scene": scene}


def describe(scene: dict) -> str:
    """The shapes of a scene, left to right, with their colours and places, as one sentence."""
    return _listing(scene) + "."


def caption(scene: dict) -> str:
    """A one-sentence description of a scene's shapes, left to right, and its background."""
    bg = {"plain": "a plain", "gradient": "a shaded", "speckled": "a speckled", "blotchy": "a blotchy"}
    return f"{_listing(scene)}, on {bg[scene['background']['kind']]} light background."


def _listing(scene: dict) -> str:
    size = scene["size"]

    def where(s: dict) -> str:
        col = ("left", "center", "right")[min(2, s["x"] * 3 // size)]
        row = ("top", "middle", "bottom")[min(2, s["y"] * 3 // size)]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"at the {row} {col}"

    parts = [f"a {s['color']} {s['shape']} {where(s)}" for s in sorted(scene["shapes"], key=lambda s: s["x"])]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listing[0].upper()}{listing[1:]}"


def plan_split(n: int, seed: int, split: str, *, mix: Optional[dict] = None, size: int = IMAGE_SIZE) -> list[dict]:
    """``n`` problems (with their ``scene``) of one split, without rendering any image.

    Depends only on (n, seed, split, mix, size): adding training problems does not change
    the test set.
    """
    mix = dict(mix or DEFAULT_MIX)
    unknown = set(mix) - set(_INFO)
    if unknown:
        raise ValueError(f"unknown question categories {sorted(unknown)}; valid: {', '.join(_INFO)}")
    rng = random.Random(f"pill-synth:{_SCENE_STREAM}:{seed}:{split}")
    balancer = _Balancer(random.Random(f"pill-synth-positions:{seed}:{split}"))
    return [_problem(rng, balancer, c, size) for c in deal_categories(n, mix, rng)]


def deal_categories(n: int, mix: dict, rng: random.Random) -> list[str]:
    """``n`` question categories in the proportions of ``mix`` (exact counts by largest remainder),
    in an order shuffled by ``rng``."""
    total = sum(mix.values())
    quota = {c: n * w / total for c, w in mix.items()}
    counts = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: counts[c] - quota[c])[: n - sum(counts.values())]:
        counts[c] += 1
    categories = [c for c in mix for _ in range(counts[c])]
    rng.shuffle(categories)
    return categories


# -- rendering ---------------------------------------------------------------------------

def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r * 1.15 if i % 2 == 0 else r * 0.5
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    return points


def render(scene: dict):
    """The scene as an RGB PIL image (deterministic)."""
    import numpy as np
    from PIL import Image, ImageDraw

    size = scene["size"]
    bg = scene["background"]
    c1 = np.array(bg["color"], dtype=np.float32)
    if bg["kind"] == "gradient":
        c2 = np.array(bg["color2"], dtype=np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        if bg["direction"] == "horizontal":
            w = np.broadcast_to(t[None, :], (size, size))
        elif bg["direction"] == "vertical":
            w = np.broadcast_to(t[:, None], (size, size))
        else:
            w = (t[None, :] + t[:, None]) / 2
        arr = c1 + (c2 - c1) * w[..., None]
    else:
        arr = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
        if bg["kind"] in ("speckled", "blotchy"):
            g = np.random.default_rng(bg["noise_seed"])
            if bg["kind"] == "speckled":
                noise = g.normal(0.0, bg["amplitude"] / 2, (size, size)).astype(np.float32)
            else:
                coarse = g.uniform(-bg["amplitude"], bg["amplitude"], (8, 8)).astype(np.float32)
                noise = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
            arr = arr + noise[..., None]
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        x, y, r, fill = s["x"], s["y"], s["r"], COLORS[s["color"]]
        if s["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s["shape"] == "square":
            h = 0.85 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif s["shape"] == "triangle":
            R = 1.15 * r
            draw.polygon([(x + R * math.cos(a), y + R * math.sin(a))
                          for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=fill)
        else:
            draw.polygon(_star(x, y, r), fill=fill)
    return img


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)  # as small as level 6 here, twice as fast
    return buf.getvalue()


def _write(path: Path, data: Union[bytes, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)


def make_synth(out_dir: Union[str, os.PathLike], n_train: int, n_test: int, seed: int = 0, *,
               n_val: Optional[int] = None, mix: Optional[dict] = None, size: int = IMAGE_SIZE,
               progress: bool = True) -> dict[str, Any]:
    """Write the synthetic benchmark to ``out_dir`` in the ScienceQA layout.

    Args:
        n_train, n_test, n_val: problems per split (``n_val`` defaults to ``n_test``).
        mix: category -> weight (default ``DEFAULT_MIX``: half of the questions ask a colour).
        size: image side in pixels.
    Returns a summary: path, split sizes, category counts, and the text-only baselines of
    :func:`text_baseline` (which must stay near ``chance``).
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_val", n_val)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    out = Path(out_dir)
    n_val = n_test if n_val is None else n_val
    plans = {split: plan_split(n, seed, split, mix=mix, size=size)
             for split, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    problems: dict[str, dict] = {}
    pid_splits: dict[str, list[str]] = {}
    next_id = 1
    for split, plan in plans.items():
        pid_splits[split] = []
        for p in plan:
            qid = str(next_id)
            next_id += 1
            problems[qid] = {**{k: v for k, v in p.items() if k != "scene"}, "split": split, "scene": p["scene"]}
            pid_splits[split].append(qid)

    from tqdm.auto import tqdm

    for qid, p in tqdm(problems.items(), desc="rendering", total=len(problems), disable=None if progress else True,
                       leave=False):
        _write(out / "images" / p["split"] / qid / "image.png", _png(render(p["scene"])))

    captions = {qid: caption(p["scene"]) for qid, p in problems.items()}
    rng = random.Random(f"pill-synth-captions:{seed}")
    llava = []
    for qid in pid_splits["train"]:
        prompt = rng.choice(CAPTION_PROMPTS)
        human = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
        llava.append({"id": qid, "image": f"train/{qid}/image.png",
                      "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": captions[qid]}]})
    baseline = text_baseline(problems, pid_splits["train"], pid_splits["test"])
    info = {"generator": "pill.data.synth", "version": GENERATOR_VERSION, "seed": seed, "size": size,
            "mix": dict(mix or DEFAULT_MIX), "splits": {k: len(v) for k, v in pid_splits.items()},
            "categories": dict(sorted(Counter(p["category"] for p in problems.values()).items())),
            "text_baseline": baseline,
            "llava_captions": "captions_llava.json (image paths relative to images/)"}
    dump = lambda obj: json.dumps(obj, indent=1, ensure_ascii=False) + "\n"  # noqa: E731
    _write(out / "problems.json", dump(problems))
    _write(out / "pid_splits.json", dump(pid_splits))
    _write(out / "captions.json", dump({"captions": captions}))
    _write(out / "captions_llava.json", dump(llava))
    _write(out / "synth_info.json", dump(info))
    return {"path": str(out), **info}


# -- honesty check -----------------------------------------------------------------------

def text_baseline(problems: dict[str, dict], train_qids: Sequence[str], test_qids: Sequence[str]) -> dict[str, float]:
    """Accuracy on ``test_qids`` of text-only guessers fitted on ``train_qids``.

    - ``letter_given_question``: the most frequent answer letter for the question text;
    - ``text_given_question``: the most frequent answer text for the question text, if it
      is among the options (else the first option);
    - ``chance``: the mean of 1 / number of options.
    Near-chance values mean the question text and options do not give the answer away.
    """
    letters: dict[str, Counter] = defaultdict(Counter)
    texts: dict[str, Counter] = defaultdict(Counter)
    for q in train_qids:
        p = problems[q]
        letters[p["question"]][p["answer"]] += 1
        texts[p["question"]][p["choices"][p["answer"]]] += 1
    n = len(test_qids)
    if n == 0:
        return {"chance": float("nan"), "letter_given_question": float("nan"), "text_given_question": float("nan")}
    chance = by_letter = by_text = 0.0
    for q in test_qids:
        p = problems[q]
        k = len(p["choices"])
        chance += 1 / k
        common = [i for i, _ in sorted(letters[p["question"]].items(), key=lambda kv: (-kv[1], kv[0])) if i < k]
        by_letter += (common[0] if common else 0) == p["answer"]
        ranked = [t for t, _ in sorted(texts[p["question"]].items(), key=lambda kv: (-kv[1], kv[0]))]
        guess = next((p["choices"].index(t) for t in ranked if t in p["choices"]), 0)
        by_text += guess == p["answer"]
    return {"chance": chance / n, "letter_given_question": by_letter / n, "text_given_question": by_text / n}
