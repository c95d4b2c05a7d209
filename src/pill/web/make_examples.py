"""Draw the demo's bundled example images: coloured shapes like the synthetic benchmark's.

The PNGs and ``examples.json`` under ``pill/web/examples/`` are committed; run
``python -m pill.web.make_examples`` to redraw them after changing ``EXAMPLES``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

EXAMPLES_DIR = Path(__file__).parent / "examples"
SIZE = 128

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (240, 200, 30)}

# file -> (background, [(shape, colour, box x0 y0 x1 y1)], suggested question, expected answer)
EXAMPLES = {
    "red-circle.png": ("white", [("circle", "red", (24, 24, 104, 104))],
                       "What shape is in the picture?", "a red circle"),
    "blue-square.png": ("white", [("square", "blue", (28, 28, 100, 100))],
                        "What colour is the square?", "blue"),
    "green-triangle.png": ("white", [("triangle", "green", (20, 20, 108, 108))],
                           "Which shape do you see, and what colour is it?", "a green triangle"),
    "two-shapes.png": ("white", [("circle", "yellow", (8, 40, 56, 88)), ("square", "red", (72, 40, 120, 88))],
                       "What is to the left of the red square?", "a yellow circle"),
}


def draw(background: str, shapes) -> Image.Image:
    """One example: ``shapes`` of (kind, colour name, box) on a plain background, SIZE x SIZE RGB."""
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        fill = COLOURS[colour]
        if kind == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        elif kind == "triangle":
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {kind!r}")
    return img


def main(out_dir: str | Path = EXAMPLES_DIR) -> list[Path]:
    """Write every example PNG and ``examples.json`` (file, question, answer) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for name, (background, shapes, question, answer) in EXAMPLES.items():
        draw(background, shapes).save(out / name, optimize=True)
        written.append(out / name)
        index.append({"file": name, "question": question, "answer": answer})
    (out / "examples.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return written


if __name__ == "__main__":
    for p in main(sys.argv[1] if len(sys.argv) > 1 else EXAMPLES_DIR):
        print(f"wrote {p}")
