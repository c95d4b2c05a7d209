"""LLaVA JSON: CC595K captions, LLaVA-1.5 multi-turn / text-only mixes, and bad records."""
import json
import shutil
from pathlib import Path

import pytest

from pill.data.llava import load_llava
from pill.errors import DataError

LLAVA = Path(__file__).parent / "assets" / "llava"
IMAGES = LLAVA / "images"


def test_cc595k_chat_json():
    samples = load_llava(LLAVA / "chat.json", IMAGES, check_images=True, progress=False)
    assert [s.id for s in samples] == ["GCC_0001", "GCC_0002"]
    s = samples[0]
    assert s.messages == [{"role": "user", "content": "Describe the image concisely.\n<image>"},
                          {"role": "assistant", "content": "a green square on a gray background"}]
    assert s.images == [str(IMAGES / "cc_0001.png")]
    assert samples.report.counts == {"with_image": 2, "text_only": 0, "multi_turn": 0}


def test_llava_665k_mix():
    samples = load_llava(LLAVA / "mix665k.json", IMAGES, progress=False)
    multi, text, last = samples
    assert [m["role"] for m in multi.messages] == ["user", "assistant", "user", "assistant"]
    assert multi.messages[0]["content"] == "What is in <image> this picture?"  # placeholder kept in place
    assert text.images == [] and "<image>" not in text.messages[0]["content"]
    assert last.id == "42"
    assert samples.report.counts == {"with_image": 2, "text_only": 1, "multi_turn": 1}


def test_jsonl_and_system_prompt(tmp_path):
    records = json.loads((LLAVA / "mix665k.json").read_text())
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    samples = load_llava(path, IMAGES, system_prompt="You are helpful.", progress=False)
    assert len(samples) == 3 and samples[0].messages[0] == {"role": "system", "content": "You are helpful."}
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl: malformed JSON at line 2, column 2"):
        load_llava(path, IMAGES)


def _write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


GOOD = {"id": "ok", "image": "cc_0001.png",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}

BAD = {
    "missing_image": ({**GOOD, "id": "b1", "image": "nope.png"}, "missing_image", "nope.png"),
    "image_without_placeholder": ({**GOOD, "id": "b2", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "placeholder_mismatch", "no <image>"),
    "placeholder_without_image": ({"id": "b3", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}, "placeholder_mismatch",
        "no image"),
    "two_placeholders_one_image": ({**GOOD, "id": "b4", "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]}, "placeholder_mismatch",
        "2 <image>"),
    "missing_conversations": ({"id": "b5", "image": "cc_0001.png"}, "missing_field", "conversations"),
    "missing_value": ({"id": "b6", "conversations": [{"from": "human"}]}, "missing_field", "'value'"),
    "unknown_speaker": ({"id": "b7", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}, "bad_field", "'bot'"),
    "no_answer": ({"id": "b8", "conversations": [{"from": "human", "value": "Hi"}]}, "no_answer", "no gpt turn"),
    "starts_with_gpt": ({"id": "b9", "conversations": [{"from": "gpt", "value": "Hi"}]}, "bad_field", "human"),
    "not_an_object": ("just a string", "bad_field", "record 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records(tmp_path, case, capsys):
    record, reason, text = BAD[case]
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(DataError) as e:
        load_llava(path, IMAGES, progress=False)
    assert str(path) in str(e.value) and text in str(e.value)
    if isinstance(record, dict):
        assert record["id"] in str(e.value)
    samples = load_llava(path, IMAGES, skip_bad=True, progress=False)
    assert [s.id for s in samples] == ["ok"]
    assert dict(samples.report.skipped) == {reason: 1}
    assert f"skipped 1 ({reason})" in capsys.readouterr().err


@pytest.mark.parametrize("damage,reason",
                         [("truncate", "bad_image"), ("text", "bad_image"), ("big", "image_too_large")])
def test_bad_image_files(tmp_path, damage, reason):
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    img = images / "cc_0001.png"
    if damage == "truncate":
        img.write_bytes(img.read_bytes()[:50])
    elif damage == "text":
        img.write_text("hello")
    else:
        from PIL import Image

        Image.new("RGB", (100, 100)).save(img)
    path = _write(tmp_path, [GOOD])
    assert len(load_llava(path, images, progress=False)) == 1  # existence only by default
    with pytest.raises(DataError, match="cc_0001.png"):
        load_llava(path, images, check_images=True, max_pixels=5000, progress=False)
    samples = load_llava(path, images, check_images=True, max_pixels=5000, skip_bad=True, progress=False)
    assert dict(samples.report.skipped) == {reason: 1}


def test_malformed_file(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(DataError, match=r"chat.json: malformed LLaVA JSON at line 2, column \d+"):
        load_llava(path, IMAGES)
    path.write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a list"):
        load_llava(path, IMAGES)
    with pytest.raises(DataError, match="not found"):
        load_llava(tmp_path / "absent.json", IMAGES)


def test_empty_system_prompt_is_kept_and_a_records_own_system_turn_wins(tmp_path):
    records = json.loads((LLAVA / "mix665k.json").read_text())
    samples = load_llava(_write(tmp_path, records[:1]), IMAGES, system_prompt="", progress=False)
    assert samples[0].messages[0] == {"role": "system", "content": ""}
    own = dict(records[0], conversations=[{"from": "system", "value": "Mine."}] + records[0]["conversations"])
    samples = load_llava(_write(tmp_path, [own]), IMAGES, system_prompt="Configured.", progress=False)
    assert [m for m in samples[0].messages if m["role"] == "system"] == [{"role": "system", "content": "Mine."}]
