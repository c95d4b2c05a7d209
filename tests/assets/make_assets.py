"""Write the small data fixtures of tests/test_data_*.py (run from anywhere; deterministic).

    python tests/assets/make_assets.py

scienceqa/          official layout: 6 problems, 3 small PNGs (one in the ``<split>/<qid>``
                    layout), pid_splits with train/val/test/minitest, captions.json
scienceqa_parquet/  the Hugging Face export: test-00000-of-00001.parquet (3 rows)
llava/              chat.json (CC595K), mix665k.json (LLaVA-1.5 style), images/
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def png(color, shape="square", size=16) -> bytes:
    img = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((3, 3, size - 4, size - 4), fill=color)
    else:
        d.rectangle((3, 3, size - 4, size - 4), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def problem(question, choices, answer, *, hint="", image=None, split="train", subject="natural science",
            grade="grade3", topic="physics", category="Velocity", lecture="", solution=""):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": topic, "category": category,
            "skill": "Test skill", "lecture": lecture, "solution": solution, "split": split}


PROBLEMS = {
    "101": problem("Which color is the square?", ["red", "blue"], 0, hint="Look at the picture.", image="image.png",
                   lecture="Colors have names.\nRed is a warm color.", solution="The square is red."),
    "102": problem("Which of these states is farthest north?", ["Maine", "Texas", "Ohio"], 0, subject="social science",
                   topic="geography", category="Geography", grade="grade2",
                   lecture="Maps have four cardinal directions.", solution="Maine is farthest north."),
    "103": problem("Which shape is shown?", ["square", "circle"], 1, image="image.png", split="test",
                   lecture="A circle is round.", solution="The shape is a circle."),
    "104": problem("Which word would you find on a dictionary page with the guide words cat - dog?",
                   ["cow", "egg", "bat"], 0, split="test", subject="language science", grade="grade8",
                   topic="word-study", category="Reference skills", lecture="", solution="Cow comes between."),
    "105": problem("What color is the circle?", ["green", "blue", "red", "black"], 2, hint="Figure: a circle.",
                   image="image.png", split="test", grade="grade10", lecture="Colors.", solution="It is red."),
    "106": problem("Is a rock a living thing?", ["yes", "no"], 1, split="val", grade="grade1",
                   lecture="Living things grow.", solution="A rock does not grow."),
}
SPLITS = {"train": ["101", "102"], "val": ["106"], "test": ["103", "104", "105"], "minitest": ["103"]}
CAPTIONS = {"captions": {"101": "A red square.", "103": "A blue circle.", "105": "A red circle on gray."}}


def make_scienceqa(root: Path) -> None:
    write(root / "problems.json", PROBLEMS)
    write(root / "pid_splits.json", SPLITS)
    write(root / "captions.json", CAPTIONS)
    write(root / "images" / "train" / "101" / "image.png", png((220, 30, 30)))
    write(root / "images" / "test" / "103" / "image.png", png((30, 80, 230), "circle"))
    write(root / "test" / "105" / "image.png", png((220, 30, 30), "circle"))  # the <split>/<qid> layout


def make_parquet(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [PROBLEMS[q] for q in ("103", "104", "105")]
    images = [{"bytes": png((30, 80, 230), "circle"), "path": None}, None,
              {"bytes": png((220, 30, 30), "circle"), "path": None}]
    fields = ["question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category", "skill",
              "lecture", "solution"]
    columns = {"image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    for f in fields:
        values = [r[f] for r in rows]
        columns[f] = pa.array(values, type=pa.int8()) if f == "answer" else pa.array(values)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), root / "test-00000-of-00001.parquet")


def make_llava(root: Path) -> None:
    write(root / "images" / "cc_0001.png", png((40, 180, 60)))
    write(root / "images" / "cc_0002.png", png((245, 210, 0), "circle"))
    write(root / "chat.json", [
        {"id": "GCC_0001", "image": "cc_0001.png", "conversations": [
            {"from": "human", "value": "Describe the image concisely.\n<image>"},
            {"from": "gpt", "value": "a green square on a gray background"}]},
        {"id": "GCC_0002", "image": "cc_0002.png", "conversations": [
            {"from": "human", "value": "<image>\nProvide a brief description of the given image."},
            {"from": "gpt", "value": "a yellow circle"}]},
    ])
    write(root / "mix665k.json", [
        {"id": "000000001", "image": "cc_0001.png", "conversations": [
            {"from": "human", "value": "What is in <image> this picture?"},
            {"from": "gpt", "value": "A green square."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": "Green."}]},
        {"id": "text_only_1", "conversations": [
            {"from": "human", "value": "Name a primary color."},
            {"from": "gpt", "value": "Red."}]},
        {"id": 42, "image": "cc_0002.png", "conversations": [
            {"from": "human", "value": "<image>\nIs the shape round?"},
            {"from": "gpt", "value": "Yes."}]},
    ])


if __name__ == "__main__":
    make_scienceqa(HERE / "scienceqa")
    make_parquet(HERE / "scienceqa_parquet")
    make_llava(HERE / "llava")
    print("wrote", ", ".join(str(p.relative_to(HERE)) for p in sorted(HERE.rglob("*")) if p.is_file()))
