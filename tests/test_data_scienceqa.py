"""ScienceQA loading: official layout, parquet export, augmentation, and every bad-input case."""
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from pill.data import Sample, SampleList
from pill.data.prompts import OPTION_LETTERS, PromptOptions
from pill.data.scienceqa import load_problems, load_scienceqa, load_split, scienceqa_stats, wrong_answer_variant
from pill.errors import ConfigError, DataError

ASSETS = Path(__file__).parent / "assets"
SQA = ASSETS / "scienceqa"
PARQUET = ASSETS / "scienceqa_parquet"


@pytest.fixture
def root(tmp_path):
    """A writable copy of the ScienceQA fixture."""
    dst = tmp_path / "sqa"
    shutil.copytree(SQA, dst)
    return dst


def _edit_problems(root, fn):
    path = root / "problems.json"
    problems = json.loads(path.read_text())
    fn(problems)
    path.write_text(json.dumps(problems))


def test_official_layout_test_split():
    samples = load_scienceqa(SQA, "test", prompt_format="QCM-ALE", progress=False)
    assert isinstance(samples, SampleList) and [s.id for s in samples] == ["103", "104", "105"]
    s103, s104, s105 = samples
    assert s103.images == [str(SQA / "images" / "test" / "103" / "image.png")]
    assert s105.images == [str(SQA / "test" / "105" / "image.png")]  # the <split>/<qid> layout
    assert s104.images == []
    assert s103.messages[0]["content"].startswith("<image>\nQuestion: Which shape is shown?\nContext: N/A\n")
    assert not s104.messages[0]["content"].startswith("<image>")
    assert s103.messages[1]["content"] == "The answer is B. BECAUSE: A circle is round. The shape is a circle."
    assert s105.meta["answer"] == 2 and s105.meta["grade"] == "grade10" and s105.meta["has_image"]
    assert s104.meta["subject"] == "language science" and s104.meta["choices"] == ["cow", "egg", "bat"]
    r = samples.report
    assert (r.total, r.kept, r.num_skipped) == (3, 3, 0)
    assert r.counts["with_image"] == 2 and r.counts["with_hint"] == 1


def test_other_splits_and_captions():
    assert [s.id for s in load_scienceqa(SQA, "train", progress=False)] == ["101", "102"]
    assert [s.id for s in load_scienceqa(SQA, "val", progress=False)] == ["106"]
    mini = load_scienceqa(SQA, "minitest", progress=False)  # minitest images live under images/test
    assert mini[0].images == [str(SQA / "images" / "test" / "103" / "image.png")]
    cap = load_scienceqa(SQA, "test", use_caption=True, progress=False)
    assert "Context: A blue circle.\n" in cap[0].messages[0]["content"]
    assert "Context: Figure: a circle. A red circle on gray.\n" in cap[2].messages[0]["content"]
    assert "Context: N/A\n" in cap[1].messages[0]["content"]  # no caption for 104


def test_use_caption_without_captions_file(root):
    (root / "captions.json").unlink()
    with pytest.raises(DataError, match="captions.json"):
        load_scienceqa(root, "test", use_caption=True, progress=False)


def test_load_problems_and_split():
    problems = load_problems(SQA)
    assert len(problems) == 6 and problems["102"]["subject"] == "social science"
    assert load_split(SQA, "test") == ["103", "104", "105"]
    with pytest.raises(DataError, match="available: train, val, test, minitest"):
        load_split(SQA, "dev2")


def test_parquet_export_matches_official():
    samples = load_scienceqa(PARQUET, "test", prompt_format="QCM-LEA", progress=False)
    official = load_scienceqa(SQA, "test", prompt_format="QCM-LEA", progress=False)
    assert [s.id for s in samples] == ["test-0", "test-1", "test-2"]
    assert [s.messages for s in samples] == [s.messages for s in official]
    assert isinstance(samples[0].images[0], bytes) and samples[1].images == []
    problems = load_problems(PARQUET)
    assert problems["test-2"]["image"] == "image.png" and problems["test-1"]["image"] is None
    assert problems["test-0"]["split"] == "test"
    assert load_split(PARQUET, "test") == ["test-0", "test-1", "test-2"]
    # a single parquet file works as root too
    assert len(load_scienceqa(next(PARQUET.glob("*.parquet")), "test", progress=False)) == 3


def test_parquet_split_and_id_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(next(PARQUET.glob("*.parquet")))
    table = table.append_column("split", pa.array(["train", "validation", "train"]))
    table = table.append_column("id", pa.array([7, 8, 9]))
    pq.write_table(table, tmp_path / "data.parquet")
    assert load_split(tmp_path, "train") == ["7", "9"]
    assert load_split(tmp_path, "val") == load_split(tmp_path, "validation") == ["8"]
    assert [s.id for s in load_scienceqa(tmp_path, "validation", progress=False)] == ["8"]


def test_parquet_split_from_file_name(tmp_path):
    shutil.copy(next(PARQUET.glob("*.parquet")), tmp_path / "validation-00000-of-00001-6c73.parquet")
    assert load_split(tmp_path, "val") == ["val-0", "val-1", "val-2"]
    shutil.copy(next(PARQUET.glob("*.parquet")), tmp_path / "odd.parquet")
    with pytest.raises(DataError, match="odd.parquet"):
        load_problems(tmp_path)


def test_parquet_missing_column(tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(next(PARQUET.glob("*.parquet"))).drop_columns(["answer"])
    pq.write_table(table, tmp_path / "test-0.parquet")
    with pytest.raises(DataError, match="test-0.parquet.*answer"):
        load_scienceqa(tmp_path, "test", progress=False)


def test_parquet_corrupt_image_bytes(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(next(PARQUET.glob("*.parquet")))
    images = table.column("image").to_pylist()
    images[0] = {"bytes": images[0]["bytes"][:40], "path": None}
    table = table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type))
    pq.write_table(table, tmp_path / "test-0.parquet")
    with pytest.raises(DataError, match="test-0"):
        load_scienceqa(tmp_path, "test", progress=False)
    samples = load_scienceqa(tmp_path, "test", skip_bad=True, progress=False)
    assert samples.report.skipped == {"bad_image": 1} and len(samples) == 2
    assert "bad_image" in capsys.readouterr().err


def test_missing_root():
    with pytest.raises(DataError, match="not found"):
        load_scienceqa("/nonexistent/sqa", "test")


# -- random wrong answer ------------------------------------------------------------------

def _draw(seed, epoch, qid, answer, num_choices, p):
    """The option a sample with ``num_choices`` options and true ``answer`` trains on this epoch."""
    base = load_scienceqa(SQA, "test", progress=False)[0]
    choices = [f"option {i}" for i in range(num_choices)]
    problem = {**base.meta["problem"], "choices": choices, "answer": answer}
    sample = replace(base, id=qid, meta={**base.meta, "answer": answer, "target_answer": answer,
                                         "choices": choices, "problem": problem})
    return wrong_answer_variant(sample, seed, epoch, p).meta["target_answer"]


def test_wrong_answer_draw_deterministic_and_per_epoch():
    assert all(_draw(0, e, "q", 1, 4, 0.0) == 1 for e in range(50))
    draws = [_draw(3, e, "q", 1, 4, 1.0) for e in range(60)]
    assert all(d != 1 and 0 <= d < 4 for d in draws) and set(draws) == {0, 2, 3}
    assert draws == [_draw(3, e, "q", 1, 4, 1.0) for e in range(60)]  # same (seed, epoch) -> same
    # p = 0.1 of the answers change, re-drawn each epoch, different seeds differ
    hits = Counter(_draw(0, e, str(q), 0, 3, 0.1) != 0 for q in range(200) for e in range(10))
    assert 0.07 < hits[True] / 2000 < 0.13
    a = [_draw(0, 0, str(q), 0, 3, 0.5) for q in range(100)]
    assert a != [_draw(0, 1, str(q), 0, 3, 0.5) for q in range(100)]
    assert a != [_draw(1, 0, str(q), 0, 3, 0.5) for q in range(100)]


def test_wrong_answer_variant():
    clean = load_scienceqa(SQA, "test", prompt_format="QCM-AE", progress=False)
    assert all(s.meta["target_answer"] == s.meta["answer"] for s in clean)
    samples = [wrong_answer_variant(s, 5, 0, 1.0) for s in clean]
    for s in samples:
        assert s.meta["target_answer"] != s.meta["answer"]
        assert s.messages[-1]["content"].startswith(f"The answer is {OPTION_LETTERS[s.meta['target_answer']]}.")
    again = [wrong_answer_variant(s, 5, 0, 1.0) for s in clean]
    assert [s.messages for s in samples] == [s.messages for s in again]
    assert clean[0].messages[-1]["content"] == "The answer is B. BECAUSE: The shape is a circle."
    assert samples[0].messages[0] == clean[0].messages[0]  # only the target changes
    plain = load_scienceqa(SQA, "test", progress=False)
    by_epoch = [[wrong_answer_variant(s, 0, e, 1.0).messages[-1]["content"] for s in plain] for e in range(6)]
    assert by_epoch == [[wrong_answer_variant(s, 0, e, 1.0).messages[-1]["content"] for s in plain]
                        for e in range(6)]
    assert len({tuple(x) for x in by_epoch}) > 1
    assert all(wrong_answer_variant(s, 0, 3, 0.0) is s for s in plain)
    chat = Sample(id="c1", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert wrong_answer_variant(chat, 0, 0, 1.0) is chat  # not a ScienceQA problem: kept


def test_prompt_options():
    opts = PromptOptions.from_format("QCM-ALE", use_caption=True)
    assert (opts.input_format, opts.output_format, opts.format, opts.use_caption) == ("QCM", "ALE", "QCM-ALE", True)
    by_options = load_scienceqa(SQA, "test", opts, progress=False)
    by_keywords = load_scienceqa(SQA, "test", prompt_format="QCM-ALE", use_caption=True, progress=False)
    assert [s.messages for s in by_options] == [s.messages for s in by_keywords]
    assert by_options[0].meta["format"] == "QCM-ALE"
    with pytest.raises(ConfigError, match="QXX"):
        PromptOptions("QXX", "A")
    with pytest.raises(ConfigError, match="QCM-X"):
        load_scienceqa(SQA, "test", prompt_format="QCM-X", progress=False)


def test_stats(root):
    (root / "test" / "105" / "image.png").unlink()
    stats = scienceqa_stats(root, "test")
    assert stats == {"problems": 3, "with_image": 2, "with_hint": 1, "no_context": 1, "missing_image_files": 1,
                     "unknown_qids": 0, "invalid": 0}


# -- bad input: a DataError naming file and problem, or a counted skip ---------------------

def _bad_case(root, case):
    """Break the fixture copy in one way; return (problem id, reason, text expected in the message)."""
    img = root / "images" / "test" / "103" / "image.png"
    if case == "missing_image":
        img.unlink()
        return "103", "missing_image", str(img)
    if case == "unreadable_image":  # a folder where the file should be
        img.unlink()
        img.mkdir()
        return "103", "bad_image", "not a regular file"
    if case == "not_an_image":
        img.write_text("this is not a png")
        return "103", "bad_image", "not an image"
    if case == "truncated_image":
        img.write_bytes(img.read_bytes()[:60])
        return "103", "bad_image", "image.png"
    if case == "too_many_pixels":
        from PIL import Image

        Image.new("RGB", (64, 64), "red").save(img)
        return "103", "image_too_large", "4096 pixels"
    if case == "missing_field":
        _edit_problems(root, lambda p: p["104"].pop("question"))
        return "104", "missing_field", "question"
    if case == "answer_out_of_range":
        _edit_problems(root, lambda p: p["104"].update(answer=3))
        return "104", "bad_answer", "out of range"
    if case == "empty_choices":
        _edit_problems(root, lambda p: p["104"].update(choices=[], answer=0))
        return "104", "empty_choices", "empty"
    if case == "unknown_qid":
        splits = json.loads((root / "pid_splits.json").read_text())
        splits["test"].append("999")
        (root / "pid_splits.json").write_text(json.dumps(splits))
        return "999", "unknown_qid", "pid_splits.json"
    if case == "placeholder_without_image":
        _edit_problems(root, lambda p: p["104"].update(question="What is in <image>?"))
        return "104", "placeholder_mismatch", "no image"
    raise AssertionError(case)


CASES = ["missing_image", "unreadable_image", "not_an_image", "truncated_image", "too_many_pixels", "missing_field",
         "answer_out_of_range", "empty_choices", "unknown_qid", "placeholder_without_image"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_naming_file_and_problem(root, case):
    qid, _, text = _bad_case(root, case)
    with pytest.raises(DataError) as e:
        load_scienceqa(root, "test", max_pixels=1000, progress=False)
    msg = str(e.value)
    assert f"problem {qid}" in msg and text in msg and str(root) in msg


@pytest.mark.parametrize("case", CASES)
def test_bad_input_skipped_and_counted(root, case, capsys):
    qid, reason, _ = _bad_case(root, case)
    samples = load_scienceqa(root, "test", max_pixels=1000, skip_bad=True, progress=False)
    assert qid not in [s.id for s in samples]
    assert dict(samples.report.skipped) == {reason: 1}
    assert samples.report.kept == len(samples) == samples.report.total - 1
    err = capsys.readouterr().err
    assert f"skipped 1 ({reason})" in err and qid in err


def test_bad_images_pass_without_decoding(root):
    _bad_case(root, "truncated_image")
    assert len(load_scienceqa(root, "test", check_images=False, progress=False)) == 3


@pytest.mark.parametrize("name", ["problems.json", "pid_splits.json", "captions.json"])
def test_malformed_json_names_file_line_and_column(root, name):
    (root / name).write_text('{\n  "a": [1, 2,\n}')
    with pytest.raises(DataError) as e:
        load_scienceqa(root, "test", use_caption=True, skip_bad=True, progress=False)
    msg = str(e.value)
    assert name in msg and "line 3" in msg and "column" in msg


def test_wrong_json_shapes(root):
    (root / "problems.json").write_text("[]")
    with pytest.raises(DataError, match="problems.json: expected an object"):
        load_problems(root)
    (root / "pid_splits.json").write_text('{"test": "103"}')
    with pytest.raises(DataError, match="pid_splits.json"):
        load_split(root, "test")


def test_several_bad_problems_counted_per_reason(root):
    _bad_case(root, "missing_image")
    _bad_case(root, "answer_out_of_range")
    _bad_case(root, "unknown_qid")
    samples = load_scienceqa(root, "test", skip_bad=True, progress=False)
    assert [s.id for s in samples] == ["105"]
    assert dict(samples.report.skipped) == {"missing_image": 1, "bad_answer": 1, "unknown_qid": 1}
    assert "kept 1 of 4" in samples.report.summary()
