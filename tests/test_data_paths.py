"""Data paths stay inside their folder: a sample's media path that resolves outside the image folder
(LLaVA) or the ScienceQA root -- through ``../``, an absolute path or a symlink -- is refused,
naming the sample and the JSON file, before the file is opened; ``data.allow_outside_root`` lets
such paths through."""
import builtins
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pill.data import BadSample
from pill.data.llava import load_llava
from pill.data.scienceqa import load_scienceqa
from pill.errors import ConfigError

SQA = Path(__file__).parent / "assets" / "scienceqa"


@pytest.fixture
def opened(monkeypatch):
    """The paths opened through ``open`` / ``io.open`` / ``Image.open`` while the test runs."""
    seen = []
    real_open, real_image_open = builtins.open, Image.open

    def spy_open(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_image_open(fp, *args, **kwargs):
        seen.append(str(getattr(fp, "name", fp)))
        return real_image_open(fp, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(Image, "open", spy_image_open)
    return seen


def touched(opened) -> bool:
    """Whether any opened path leads (through links too) to a file named secret*."""
    return any("secret" in os.path.realpath(p) for p in opened)


@pytest.fixture
def layout(tmp_path):
    """``data/images/in.png`` inside the image folder, ``secret/secret.png`` outside it."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(images / "in.png")
    (tmp_path / "secret").mkdir()
    secret = tmp_path / "secret" / "secret.png"
    Image.new("RGB", (8, 8), "blue").save(secret)
    return images, secret


def write_llava(path: Path, image) -> Path:
    records = [{"id": "ok", "image": "in.png",
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]},
               {"id": "evil", "image": image,
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}]
    path.write_text(json.dumps(records))
    return path


def _ways_out(images: Path, secret: Path) -> dict:
    (images / "link.png").symlink_to(secret)
    (images / "linkdir").symlink_to(secret.parent, target_is_directory=True)
    return {"dotdot": "../../secret/secret.png", "absolute": str(secret), "symlink": "link.png",
            "symlinked_folder": "linkdir/secret.png"}


@pytest.mark.parametrize("way", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_llava_path_outside_the_image_folder_is_refused_before_it_is_opened(layout, opened, way):
    images, secret = layout
    ref = _ways_out(images, secret)[way]
    data = write_llava(images.parent / "data.json", ref)
    with pytest.raises(BadSample, match=r"data\.json: sample evil: image path .* is outside the image folder") as e:
        load_llava(data, images, check_images=True, progress=False)
    assert e.value.reason == "outside_root" and "allow_outside_root" in str(e.value)
    assert not touched(opened), opened
    # skipped and counted with skip_bad, the good sample is kept
    samples = load_llava(data, images, check_images=True, skip_bad=True, progress=False)
    assert [s.id for s in samples] == ["ok"] and samples.report.skipped["outside_root"] == 1
    assert not touched(opened), opened


@pytest.mark.parametrize("way", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_llava_allow_outside_root_lets_them_through(layout, way):
    images, secret = layout
    ref = _ways_out(images, secret)[way]
    data = write_llava(images.parent / "data.json", ref)
    samples = load_llava(data, images, check_images=True, allow_outside_root=True, progress=False)
    assert [s.id for s in samples] == ["ok", "evil"]
    assert Path(samples[1].images[0]).resolve() == secret.resolve()


def test_llava_symlink_that_stays_inside_is_fine(layout):
    images, _ = layout
    (images / "sub").mkdir()
    (images / "sub" / "alias.png").symlink_to(images / "in.png")
    data = write_llava(images.parent / "data.json", "sub/../sub/alias.png")
    assert len(load_llava(data, images, check_images=True, progress=False)) == 2


def test_llava_other_modality_paths_are_checked_too(layout, opened):
    from pill.modalities import Modality, register_modality, unregister_modality

    images, secret = layout
    register_modality(Modality("sound", 90, "<sound>", lambda ref, **kw: ref, noun="sound clip"))
    try:
        records = [{"id": "s1", "sound": ["../../secret/secret.png"],
                    "conversations": [{"from": "human", "value": "<sound>\nHi"}, {"from": "gpt", "value": "Hello"}]}]
        data = images.parent / "data.json"
        data.write_text(json.dumps(records))
        with pytest.raises(BadSample, match=r"data\.json: sample s1: sound clip path .* is outside the image folder"):
            load_llava(data, images, progress=False)
        assert load_llava(data, images, allow_outside_root=True, progress=False)[0].media["sound"]
    finally:
        unregister_modality("sound")
    assert not touched(opened), opened


@pytest.fixture
def sqa(tmp_path):
    root = tmp_path / "sqa"
    shutil.copytree(SQA, root)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "blue").save(secret)
    return root, secret


def _set_image(root: Path, qid: str, image: str) -> None:
    path = root / "problems.json"
    problems = json.loads(path.read_text())
    problems[qid]["image"] = image
    path.write_text(json.dumps(problems))


@pytest.mark.parametrize("way", ["dotdot", "absolute", "symlink"])
def test_scienceqa_image_outside_the_root_is_refused_before_it_is_opened(sqa, opened, way):
    root, secret = sqa
    if way == "symlink":
        target = root / "images" / "test" / "103" / "image.png"
        target.unlink()
        target.symlink_to(secret)
        _set_image(root, "103", "image.png")
    else:
        _set_image(root, "103", "../../../../secret.png" if way == "dotdot" else str(secret))
    with pytest.raises(BadSample, match=r"problems\.json: problem 103: image path .* is outside the ScienceQA "
                                        r"root") as e:
        load_scienceqa(root, "test", progress=False)
    assert e.value.reason == "outside_root"
    assert not touched(opened), opened
    samples = load_scienceqa(root, "test", skip_bad=True, progress=False)
    assert [s.id for s in samples] == ["104", "105"] and samples.report.skipped["outside_root"] == 1
    allowed = load_scienceqa(root, "test", allow_outside_root=True, progress=False)
    assert Path(allowed[0].images[0]).resolve() == secret.resolve()


def test_scienceqa_qid_with_dotdot_is_refused(sqa, opened):
    root, secret = sqa
    for name in ("problems.json", "pid_splits.json"):
        path = root / name
        path.write_text(path.read_text().replace('"103"', '"../../../secret-dir"'))
    (root.parent / "secret-dir").mkdir()
    Image.new("RGB", (8, 8), "blue").save(root.parent / "secret-dir" / "image.png")
    opened.clear()
    with pytest.raises(BadSample, match=r"problem \.\./\.\./\.\./secret-dir: image path .* is outside"):
        load_scienceqa(root, "test", progress=False)
    assert not touched(opened), opened


def test_run_config_field_reaches_the_loaders(layout):
    from pill.build import load_dataset_samples
    from pill.runconfig import TrainConfig

    images, secret = layout
    data = write_llava(images.parent / "data.json", "../../secret/secret.png")
    raw = {"data": {"format": "llava", "json": str(data), "image_folder": str(images)}}
    with pytest.raises(BadSample, match="outside the image folder"):
        load_dataset_samples(TrainConfig.from_dict(raw), progress=False)
    raw["data"]["allow_outside_root"] = True
    assert len(load_dataset_samples(TrainConfig.from_dict(raw), progress=False)) == 2
    with pytest.raises(ConfigError, match="allow_outside_root"):
        TrainConfig.from_dict({"data": {"root": ".", "allow_outside_root": "sometimes"}})


def test_scienceqa_stats_count_an_outside_image_as_invalid(sqa):
    from pill.data.scienceqa import scienceqa_stats

    root, secret = sqa
    _set_image(root, "103", str(secret))
    assert scienceqa_stats(root, "test")["invalid"] == 1
    assert scienceqa_stats(root, "test", allow_outside_root=True)["invalid"] == 0


def test_data_inspect_command_refuses_then_allows(layout, capsys):
    from pill.cli import main

    images, _ = layout
    data = write_llava(images.parent / "data.json", "../../secret/secret.png")
    assert main(["data", "inspect", "llava", "--json", str(data), "--image-folder", str(images)]) != 0
    assert "outside the image folder" in capsys.readouterr().err
    args = ["data", "inspect", "llava", "--json", str(data), "--image-folder", str(images)]
    assert main(args + ["--allow-outside-root"]) == 0
