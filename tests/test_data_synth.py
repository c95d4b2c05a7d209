"""The synthetic shapes benchmark: determinism, honesty (text alone is at chance), consistency."""
import hashlib
import itertools
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pill.data.llava import load_llava
from pill.data.scienceqa import load_problems, load_scienceqa, load_split
from pill.data.synth import COLORS, SHAPES, caption, describe, make_synth, plan_split, render, text_baseline


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    info = make_synth(out, n_train=24, n_test=10, seed=7, n_val=6, progress=False)
    return out, info


def test_same_seed_same_bytes(synth, tmp_path):
    out, _ = synth
    make_synth(tmp_path / "b", n_train=24, n_test=10, seed=7, n_val=6, progress=False)
    first = _digest(out)
    assert len(first) == 40 + 5 and first == _digest(tmp_path / "b")
    make_synth(tmp_path / "c", n_train=24, n_test=10, seed=8, n_val=6, progress=False)
    assert _digest(tmp_path / "c")["problems.json"] != first["problems.json"]


def test_test_split_does_not_depend_on_train_size():
    assert plan_split(30, 1, "test") == plan_split(30, 1, "test")
    assert plan_split(30, 1, "test") != plan_split(30, 1, "train")


def test_scienceqa_layout_loads(synth):
    out, info = synth
    assert info["splits"] == {"train": 24, "val": 6, "test": 10}
    problems = load_problems(out)
    assert len(problems) == 40
    for split, n in info["splits"].items():
        samples = load_scienceqa(out, split, prompt_format="QCM-A", check_images=True, progress=False)
        assert len(samples) == n and samples.report.num_skipped == 0
        assert all(s.images and s.messages[0]["content"].startswith("<image>\nQuestion: ") for s in samples)
    p = problems[load_split(out, "test")[0]]
    for key in ("question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
                "skill", "lecture", "solution", "split"):
        assert key in p
    assert p["hint"] == "" and p["image"] == "image.png" and p["subject"] == "natural science"
    assert p["grade"] in {f"grade{g}" for g in range(1, 7)} and p["split"] == "test"
    captions = json.loads((out / "captions.json").read_text())["captions"]
    assert set(captions) == set(problems)
    cap = load_scienceqa(out, "test", use_caption=True, progress=False)
    assert "Context: A " in cap[0].messages[0]["content"]


def test_llava_caption_json(synth):
    out, _ = synth
    samples = load_llava(out / "captions_llava.json", out / "images", check_images=True, progress=False)
    assert [s.id for s in samples] == load_split(out, "train")
    problems = load_problems(out)
    for s in samples:
        assert s.images == [str(out / "images" / "train" / s.id / "image.png")]
        assert s.messages[1]["content"] == caption(problems[s.id]["scene"])
        assert s.messages[0]["content"].count("<image>") == 1


def test_images_show_the_scene(synth):
    out, _ = synth
    from PIL import Image

    problems = load_problems(out)
    for qid in load_split(out, "test"):
        p = problems[qid]
        img = Image.open(out / "images" / "test" / qid / "image.png")
        assert img.size == (224, 224) and img.mode == "RGB"
        for s in p["scene"]["shapes"]:  # the centre of every shape has its colour
            assert img.getpixel((s["x"], s["y"])) == COLORS[s["color"]]
    assert render(p["scene"]).tobytes() == img.tobytes()


def test_answers_follow_from_the_scene():
    for p in plan_split(400, 3, "train"):
        shapes = p["scene"]["shapes"]
        kinds = [s["shape"] for s in shapes]
        answer = p["choices"][p["answer"]]
        assert 1 <= len(shapes) <= 4 and len(set(kinds)) == len(kinds)
        assert 2 <= len(p["choices"]) <= 4 and len(set(p["choices"])) == len(p["choices"])
        q, cat = p["question"], p["category"]
        if cat == "color":
            shape = q.removeprefix("What color is the ").removesuffix("?")
            assert [s["color"] for s in shapes if s["shape"] == shape] == [answer]
        elif cat == "shape":
            color = q.removeprefix("Which shape is ").removesuffix("?")
            assert [s["shape"] for s in shapes if s["color"] == color] == [answer]
        elif cat == "exists":
            color, shape = q.removeprefix("Is there a ").removesuffix("?").split()
            assert answer == ("yes" if any(s["color"] == color and s["shape"] == shape for s in shapes) else "no")
        elif cat == "count":
            assert answer == str(len(shapes))
        else:
            key, sign = {"left": ("x", -1), "right": ("x", 1), "highest": ("y", -1), "lowest": ("y", 1)}[
                q.split()[-1].rstrip("?")]
            best = sorted(shapes, key=lambda s: -sign * s[key])
            assert best[0]["shape"] == answer and abs(best[0][key] - best[1][key]) >= 28


def test_solutions_describe_the_scene_then_answer():
    finals = {"color": "The {shape} is {answer}.", "shape": "The {color} shape is the {answer}."}
    for p in plan_split(300, 5, "train"):
        shapes = sorted(p["scene"]["shapes"], key=lambda s: s["x"])
        head = describe(p["scene"])
        assert p["solution"].startswith(head + " ")
        # every shape once, left to right, with its colour; the background is left to the caption
        named = [(w[i - 1], w[i].rstrip(",.")) for w in [head.lower().split()] for i in range(1, len(w))
                 if w[i].rstrip(",.") in SHAPES]
        assert named == [(s["color"], s["shape"]) for s in shapes]
        assert "background" not in head and caption(p["scene"]).startswith(head[:-1] + ", on ")
        tail, answer, q = p["solution"][len(head) + 1:], p["choices"][p["answer"]], p["question"]
        if p["category"] == "color":
            assert tail == finals["color"].format(shape=q.split()[-1].rstrip("?"), answer=answer)
        elif p["category"] == "shape":
            assert tail == finals["shape"].format(color=q.split()[-1].rstrip("?"), answer=answer)
        elif p["category"] == "position":
            assert tail.startswith(f"The {answer} is ")
        elif p["category"] == "count":
            n = int(answer)
            assert tail == ("There is one shape." if n == 1 else f"There are {['two', 'three', 'four'][n - 2]} shapes.")
        else:
            assert tail.startswith("There is a " if answer == "yes" else "There is no ")


def test_text_alone_is_at_chance():
    train, test = plan_split(4000, 11, "train"), plan_split(2000, 11, "test")
    problems = {f"tr{i}": p for i, p in enumerate(train)} | {f"te{i}": p for i, p in enumerate(test)}
    b = text_baseline(problems, [f"tr{i}" for i in range(4000)], [f"te{i}" for i in range(2000)])
    assert abs(b["letter_given_question"] - b["chance"]) < 0.035
    assert abs(b["text_given_question"] - b["chance"]) < 0.035
    # answer letters are balanced for every number of options, answer texts per question
    by_n = Counter((p["category"], len(p["choices"]), p["answer"]) for p in train)
    for cat, n in {(c, n) for c, n, _ in by_n}:
        counts = [by_n[(cat, n, k)] for k in range(n)]
        assert max(counts) - min(counts) <= 1
    for cat in ("color", "shape", "count", "position", "exists"):
        answers = Counter(p["choices"][p["answer"]] for p in train if p["category"] == cat)
        assert min(answers.values()) / max(answers.values()) > 0.7, (cat, answers)
    mix = Counter(p["category"] for p in train)
    assert mix["color"] == 2000 and set(mix) == {"color", "shape", "exists", "position", "count"}


def test_colours_far_apart_and_shapes():
    assert min(math.dist(a, b) for a, b in itertools.combinations(COLORS.values(), 2)) > 140
    assert len(COLORS) == 6 and set(SHAPES) == {"circle", "square", "triangle", "star"}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        make_synth(tmp_path, -1, 2)
    with pytest.raises(ValueError, match="unknown question categories"):
        plan_split(5, 0, "train", mix={"colour": 1.0})


def test_light_imports():
    # the data modules add no heavy import to what ``import pill`` itself loads
    code = ("import sys, pill; before = set(sys.modules); "
            "import pill.data.synth, pill.data.scienceqa, pill.data.llava, pill.data.prompts, pill.data.commands; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'pyarrow', 'PIL') "
            "if m in sys.modules and m not in before]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
