"""The built-in audio benchmark: deterministic, balanced, held-out voices and pitches, and no answer
reachable without the problem's own clip. Rendering needs espeak-ng (`bash .ci/install-espeak`)."""
import hashlib
import json
import os
import shutil
from collections import Counter

import pytest

from pill.data.synth import text_baseline
from pill.data.synth_audio import (MAX_CLIP_SECONDS, QUESTIONS, heard_answer, make_synth_audio, plan_split,
                                   shuffled_audio_baseline)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None and os.environ.get("CI") != "true",
                                  reason="espeak-ng is not installed; enable with: sudo bash .ci/install-espeak")


@pytest.fixture(scope="module")
def plans():
    train = {f"tr{i}": {**p, "split": "train"} for i, p in enumerate(plan_split(800, 0, "train"))}
    test = {f"te{i}": {**p, "split": "test"} for i, p in enumerate(plan_split(800, 0, "test"))}
    return train, test


def test_plans_are_deterministic_and_depend_on_the_seed():
    assert plan_split(40, 3, "test") == plan_split(40, 3, "test")
    assert plan_split(40, 3, "test") != plan_split(40, 4, "test")
    assert plan_split(40, 3, "test") != plan_split(40, 3, "val")


def test_answers_and_positions_are_balanced_per_question_type(plans):
    _, test = plans
    for category in QUESTIONS:
        group = [p for p in test.values() if p["category"] == category]
        assert len(group) == 200
        answers = Counter(p["choices"][p["answer"]] for p in group)
        assert max(answers.values()) - min(answers.values()) <= 1, (category, answers)
        for n in (2, 3, 4):  # per option count, the answer's position is dealt evenly
            pos = Counter(p["answer"] for p in group if len(p["choices"]) == n)
            if pos:
                assert max(pos.values()) - min(pos.values()) <= 1, (category, n, pos)
        for p in group:  # the question is always the same text, the answer is what the clip says
            assert p["question"] == QUESTIONS[category]
            assert p["choices"][p["answer"]] == heard_answer(category, p["clip"])
            assert 2 <= len(p["clip"]["segments"]) <= 4 and len(set(p["choices"])) == len(p["choices"])


def test_voices_pitches_and_semitones_of_the_test_split_are_not_in_training(plans):
    def seen(problems):
        voices, pitches, semitones = set(), set(), set()
        for p in problems.values():
            for s in p["clip"]["segments"]:
                if "voice" in s:
                    voices.add(s["voice"])
                    accent, variant = s["voice"].split("+")
                    voices.update({accent, variant})
                    pitches.add(s["pitch"])
                if s["kind"] == "tone":
                    semitones.add(s["midi"])
        return voices, pitches, semitones

    train, test = plans
    (tv, tp, ts), (ev, ep, es) = seen(train), seen(test)
    assert ev and ep and es
    assert not tv & ev and not tp & ep and not ts & es
    assert all(48 <= m <= 84 for m in ts | es)  # C3 .. C6
    val = {f"va{i}": p for i, p in enumerate(plan_split(200, 0, "val"))}
    vv, vp, vs = seen(val)
    assert not tv & vv and not tp & vp and not ts & vs


def test_text_alone_and_a_shuffled_clip_stay_at_chance(plans):
    train, test = plans
    text = text_baseline({**train, **test}, list(train), list(test))
    assert abs(text["letter_given_question"] - text["chance"]) < 0.05
    assert abs(text["text_given_question"] - text["chance"]) < 0.05
    for category in QUESTIONS:  # given the text alone, every answer of a question type is equally likely
        group = [q for q, p in test.items() if p["category"] == category]
        by_text = Counter((test[q]["choices"][test[q]["answer"]]) for q in group)
        assert len(by_text) == {"digit": 10, "tone": 2, "beeps": 4, "order": 2}[category]
    listen = shuffled_audio_baseline(test, list(test), seed=0)
    assert listen["own_clip"] == 1.0
    assert abs(listen["shuffled_clip"] - listen["chance"]) < 0.05, listen


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@needs_espeak
def test_same_seed_same_bytes_and_the_loaders_read_it(tmp_path):
    import numpy as np
    import soundfile as sf

    from pill.data.llava import load_llava
    from pill.data.scienceqa import load_scienceqa

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = make_synth_audio(a, 8, 4, seed=1, n_val=2, progress=False)
    make_synth_audio(b, 8, 4, seed=1, n_val=2, progress=False)
    make_synth_audio(c, 8, 4, seed=2, n_val=2, progress=False)
    assert _digests(a) == _digests(b) and _digests(a) != _digests(c)
    assert info["splits"] == {"train": 8, "val": 2, "test": 4}
    clips = sorted((a / "audio").rglob("clip.wav"))
    assert len(clips) == 14
    for f in clips:
        x, rate = sf.read(f)
        assert rate == 16_000 and x.ndim == 1 and 0.5 < len(x) / rate <= MAX_CLIP_SECONDS and np.abs(x).max() > 0.1
    test = load_scienceqa(a, "test", prompt_format="QCM-EA")
    assert len(test) == 4 and all(s.media["audio"][0].endswith("clip.wav") and not s.images for s in test)
    assert test[0].messages[0]["content"].startswith("<audio>\nQuestion: ")
    captions = load_llava(a / "captions_llava.json", a / "audio")
    assert len(captions) == 8 and captions[0].media["audio"][0] == str(a / "audio" / "train" / "1" / "clip.wav")
    problems = json.loads((a / "problems.json").read_text())
    assert captions[0].messages[-1]["content"] == json.loads((a / "captions.json").read_text())["captions"]["1"]
    assert problems["1"]["solution"].startswith(captions[0].messages[-1]["content"])


@needs_espeak
def test_cli_writes_the_benchmark(tmp_path, capsys):
    from pill.cli import main

    assert main(["data", "synth-audio", "--out", str(tmp_path / "b"), "--n-train", "2", "--n-test", "2",
                 "--n-val", "0"]) == 0
    assert "wrote 4 problems" in capsys.readouterr().out
    assert len(list((tmp_path / "b" / "audio").rglob("clip.wav"))) == 4


def test_cli_without_espeak_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from pill.cli import main

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["data", "synth-audio", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and ".ci/install-espeak" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@needs_espeak
def test_parallel_speech_prefetch_renders_the_same_samples():
    import numpy as np

    from pill.data.synth_audio import Renderer

    clips = [p["clip"] for p in plan_split(12, 3, "train")]
    one_by_one = Renderer()
    expected = [one_by_one.clip(c) for c in clips]
    parallel = Renderer()
    n = parallel.prefetch(clips, workers=4)
    assert n == len(parallel._speech) > 0
    assert parallel.prefetch(clips, workers=4) == 0  # nothing left to render
    for c, x in zip(clips, expected):
        np.testing.assert_array_equal(parallel.clip(c), x)
