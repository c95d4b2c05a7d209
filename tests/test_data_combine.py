"""pill.data.combine: benchmarks in the ScienceQA layout joined into one root."""
import json

import pytest

from pill.data.combine import combine_benchmarks
from pill.errors import DataError


def _bench(root, field, folder, name, qids):
    problems, llava = {}, []
    for i, qid in enumerate(qids):
        split = "train" if i < len(qids) - 1 else "test"
        problems[qid] = {"question": f"q{qid}", "choices": ["a", "b"], "answer": 0, field: name, "split": split}
        f = root / folder / split / qid / name
        f.parent.mkdir(parents=True)
        if field == "image":
            from PIL import Image

            Image.new("RGB", (8, 8), (int(qid) * 40, 0, 0)).save(f)
        else:
            import numpy as np
            import soundfile as sf

            sf.write(f, np.full(1600, 0.1 * int(qid), np.float32), 16000)
        if split == "train":
            llava.append({"id": qid, field: f"{split}/{qid}/{name}",
                          "conversations": [{"from": "human", "value": "<x>"}, {"from": "gpt", "value": "c"}]})
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": qids[:-1], "test": qids[-1:]}))
    (root / "captions.json").write_text(json.dumps({q: f"cap {q}" for q in qids}))
    (root / "captions_llava.json").write_text(json.dumps(llava))
    return root


def test_ids_get_a_prefix_per_source_and_files_follow(tmp_path):
    img = _bench(tmp_path / "img", "image", "images", "image.png", ["1", "2", "3"])
    aud = _bench(tmp_path / "aud", "audio", "audio", "clip.wav", ["1", "2"])
    out = tmp_path / "both"
    info = combine_benchmarks({"i": img, "a": aud}, out)
    assert info["splits"] == {"train": 3, "test": 2}
    problems = json.loads((out / "problems.json").read_text())
    assert sorted(problems) == ["a1", "a2", "i1", "i2", "i3"]
    assert problems["a1"]["source"] == "a" and problems["i3"]["split"] == "test"
    assert json.loads((out / "pid_splits.json").read_text()) == {"train": ["i1", "i2", "a1"], "test": ["i3", "a2"]}
    assert (out / "images" / "test" / "i3" / "image.png").read_bytes() == \
        (img / "images" / "test" / "3" / "image.png").read_bytes()
    assert (out / "audio" / "train" / "a1" / "clip.wav").read_bytes() == \
        (aud / "audio" / "train" / "1" / "clip.wav").read_bytes()
    llava = json.loads((out / "captions_llava.json").read_text())
    assert [r["id"] for r in llava] == ["i1", "i2", "a1"]
    assert llava[2]["audio"] == "audio/train/a1/clip.wav" and llava[0]["image"] == "images/train/i1/image.png"
    assert all((out / (r.get("image") or r.get("audio"))).is_file() for r in llava)
    assert json.loads((out / "captions.json").read_text())["a2"] == "cap 2"
    # the loaders read the joined root
    from pill.data.scienceqa import load_scienceqa

    test = load_scienceqa(out, "test", prompt_format="QCM-A", progress=False)
    assert {s.id for s in test} == {"i3", "a2"}
    by_id = {s.id: s for s in test}
    assert by_id["i3"].images and by_id["a2"].media["audio"][0].endswith("audio/test/a2/clip.wav")


def test_missing_files_and_sources_are_named(tmp_path):
    img = _bench(tmp_path / "img", "image", "images", "image.png", ["1", "2"])
    (img / "images" / "train" / "1" / "image.png").unlink()
    with pytest.raises(DataError, match=r"img/images/train/1/image.png: file not found"):
        combine_benchmarks({"i": img}, tmp_path / "out")
    with pytest.raises(DataError, match=r"nothing/problems.json: not found"):
        combine_benchmarks({"x": tmp_path / "nothing"}, tmp_path / "out2")
