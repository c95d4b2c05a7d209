"""A built-in audio benchmark: short clips of speech, tones, beeps and noise; questions only the audio answers.

A clip is 2-4 segments separated by silence: spoken digits and words (espeak-ng, with a random
voice, speed and pitch), sine tones on the semitone scale from C3 to C6, trains of 1-4 beeps, and
bursts of noise. Each problem asks one multiple-choice question about its clip:

========  ===========================================  =============
category  question                                     options
========  ===========================================  =============
digit     Which digit was spoken second?               2-4 digits
tone      Is the second tone higher than the first?    yes / no
beeps     How many beeps are there?                    2-4 of 1..4
order     Which came first, the word or the tone?      word / tone
========  ===========================================  =============

Text alone cannot answer: each category's answer is dealt from a shuffled deck (every value
equally often), distractors are drawn symmetrically, and the answer's position is balanced
(:func:`~pill.data.synth.text_baseline` measures it); with another problem's clip of the same
category, a perfect listener is at chance (:func:`shuffled_audio_baseline`). The voices (accent +
espeak variant), the speakers' pitches and the tones' semitones of the val and test splits are
never used in training. Written in the layout of the image benchmark (:mod:`pill.data.synth`):
``problems.json`` (each problem's ``audio`` names its clip), ``pid_splits.json``,
``captions.json``, ``audio/<split>/<qid>/clip.wav`` (16 kHz, 16-bit mono) and
``captions_llava.json`` (the train clips' descriptions, paths relative to ``audio/``). The
explanation (``solution``) first describes the clip in order, then states the fact asked for.
The same arguments give the same bytes.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import PillError

GENERATOR_VERSION = 1
SAMPLE_RATE = 16_000
MAX_CLIP_SECONDS = 5.0  # every clip fits a 5 s encoder window
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("apple", "river", "garden", "window", "yellow", "music", "rabbit", "candle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Held out: val and test speak with other accents, other espeak variants and other speaker pitches,
# and their tones sit on other semitones, than anything in training.
ACCENTS = {"train": ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan"),
           "test": ("en-gb-x-gbcwmd", "en-029")}
VARIANTS = {"train": ("m1", "m2", "m3", "m4", "f1", "f2", "f3"), "test": ("m5", "m6", "f4", "f5")}
SPEAKER_PITCHES = {"train": (20, 35, 50, 65, 80), "test": (28, 58, 72)}
SPEEDS = (140, 155, 170, 185)  # words per minute
LOW_MIDI, HIGH_MIDI = 48, 84  # C3 .. C6
SEMITONES = {"train": tuple(m for m in range(LOW_MIDI, HIGH_MIDI + 1) if (m - LOW_MIDI) % 3 != 1),
             "test": tuple(m for m in range(LOW_MIDI, HIGH_MIDI + 1) if (m - LOW_MIDI) % 3 == 1)}
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DEFAULT_MIX = {"digit": 0.25, "tone": 0.25, "beeps": 0.25, "order": 0.25}
QUESTIONS = {"digit": "Which digit was spoken second?", "tone": "Is the second tone higher than the first?",
             "beeps": "How many beeps are there?", "order": "Which came first, the word or the tone?"}
_INFO = {  # category -> (task, grade, topic, skill)
    "digit": ("closed choice", "grade1", "spoken-digits", "Recognise a spoken digit"),
    "tone": ("yes or no", "grade2", "pitch", "Compare the pitch of two tones"),
    "beeps": ("closed choice", "grade1", "counting-sounds", "Count beeps"),
    "order": ("closed choice", "grade2", "sound-order", "Tell which sound came first"),
}
CAPTION_PROMPTS = (
    "Describe the audio clip briefly.",
    "What do you hear? Answer briefly.",
    "List the sounds of this clip in order.",
    "Give a short description of the recording.",
)
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def _pool(split: str) -> str:
    return "train" if split == "train" else "test"


def note_name(midi: int) -> str:
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


# -- planning ----------------------------------------------------------------------------------

class _Deck:
    """Values dealt from shuffled decks, so every value of a category comes up equally often."""

    def __init__(self, rng: random.Random):
        self.rng, self.decks = rng, {}

    def draw(self, key, values: Sequence):
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck.extend(values)
            self.rng.shuffle(deck)
        return deck.pop()


def _voice(rng: random.Random, split: str) -> dict:
    p = _pool(split)
    return {"voice": f"{rng.choice(ACCENTS[p])}+{rng.choice(VARIANTS[p])}", "pitch": rng.choice(SPEAKER_PITCHES[p]),
            "speed": rng.choice(SPEEDS)}


def _segment(rng: random.Random, split: str, kind: str, **fixed) -> dict:
    if kind in ("digit", "word"):
        text = fixed.get("text") or rng.choice(DIGITS if kind == "digit" else WORDS)
        return {"kind": kind, "text": text, **_voice(rng, split)}
    if kind == "tone":
        return {"kind": "tone", "midi": fixed.get("midi", rng.choice(SEMITONES[_pool(split)])),
                "seconds": rng.choice((0.3, 0.35, 0.4, 0.45)), "amp": rng.choice((0.3, 0.4, 0.5))}
    if kind == "beeps":
        return {"kind": "beeps", "count": fixed.get("count", rng.randint(1, 4)), "freq": rng.choice((1500, 2000, 2500)),
                "amp": rng.choice((0.3, 0.4))}
    if kind == "noise":
        return {"kind": "noise", "seconds": rng.choice((0.2, 0.25, 0.3)), "amp": rng.choice((0.05, 0.1, 0.15)),
                "seed": rng.getrandbits(32)}
    raise ValueError(f"unknown segment kind {kind!r}")


def _insert_extra(rng: random.Random, split: str, segments: list, kinds: Sequence[str], k: int) -> list:
    """``segments`` with ``k`` extra segments of ``kinds`` at random places."""
    for _ in range(k):
        segments.insert(rng.randint(0, len(segments)), _segment(rng, split, rng.choice(kinds)))
    return segments


def _options(rng: random.Random, deck: _Deck, category: str, answer: str, preferred: Sequence[str],
             pool: Sequence[str], n: int) -> tuple[list[str], int]:
    """``n`` options: the answer at a balanced position, distractors from ``preferred`` first."""
    from .synth import place_options

    return place_options(rng, answer, preferred, pool, n, lambda: deck.draw(("position", category, n), range(n)))


def _problem(rng: random.Random, deck: _Deck, split: str, category: str) -> dict:
    if category == "digit":
        answer = deck.draw("digit", DIGITS)
        others = rng.sample([d for d in DIGITS if d != answer], rng.choice((1, 2)))
        spoken = [others[0], answer] + others[1:]
        segments = [_segment(rng, split, "digit", text=t) for t in spoken]
        segments = _insert_extra(rng, split, segments, ("tone", "noise", "beeps"), rng.choice((0, 1)) if
                                 len(segments) < 3 else rng.choice((0, 0, 1)))
        choices, index = _options(rng, deck, category, answer, others, DIGITS, rng.choice((2, 3, 4)))
        fact = f"The second digit is {answer}."
    elif category == "tone":
        higher = deck.draw("tone", (True, False))
        scale = SEMITONES[_pool(split)]
        for _ in range(100):
            a, b = rng.sample(scale, 2)
            if abs(a - b) <= 12 and (b > a) == higher:
                break
        else:  # pragma: no cover - two semitones within an octave always exist
            raise RuntimeError("could not pick two tones")
        segments = [_segment(rng, split, "tone", midi=a), _segment(rng, split, "tone", midi=b)]
        segments = _insert_extra(rng, split, segments, ("word", "noise", "beeps"), rng.choice((0, 1)))
        answer = "yes" if higher else "no"
        pos = deck.draw(("position", category, 2), range(2))
        other = "no" if higher else "yes"
        choices, index = ([answer, other] if pos == 0 else [other, answer]), pos
        fact = (f"The first tone is {note_name(a)} and the second {note_name(b)}: the second is "
                f"{'higher' if higher else 'lower'}.")
    elif category == "beeps":
        count = deck.draw("beeps", (1, 2, 3, 4))
        segments = _insert_extra(rng, split, [_segment(rng, split, "beeps", count=count)],
                                 ("digit", "word", "tone", "noise"), rng.choice((1, 2)))
        answer = str(count)
        choices, index = _options(rng, deck, category, answer, [], [str(i) for i in COUNT_WORDS], rng.choice((2, 3, 4)))
        fact = "There is one beep." if count == 1 else f"There are {COUNT_WORDS[count]} beeps."
    elif category == "order":
        word_first = deck.draw("order", (True, False))
        pair = [_segment(rng, split, "word"), _segment(rng, split, "tone")]
        segments = pair if word_first else pair[::-1]
        segments = _insert_extra(rng, split, segments, ("noise", "beeps"), rng.choice((0, 1)))
        answer = "the word" if word_first else "the tone"
        pos = deck.draw(("position", category, 2), range(2))
        other = "the tone" if word_first else "the word"
        choices, index = ([answer, other] if pos == 0 else [other, answer]), pos
        fact = f"The {'word' if word_first else 'tone'} came first."
    else:
        raise ValueError(f"unknown question category {category!r}; valid: {', '.join(_INFO)}")
    gaps = [rng.choice((0.05, 0.1, 0.15))] + [rng.choice((0.15, 0.2, 0.25, 0.3)) for _ in segments[1:]] + \
        [rng.choice((0.05, 0.1, 0.15))]
    clip = {"segments": segments, "gaps": gaps}
    task, grade, topic, skill = _INFO[category]
    return {"question": QUESTIONS[category], "choices": choices, "answer": index, "hint": "", "image": None,
            "audio": "clip.wav", "task": task, "grade": grade, "subject": "natural science", "topic": topic,
            "category": category, "skill": skill, "lecture": "", "solution": f"{describe(clip)} {fact}",
            "clip": clip}


def plan_split(n: int, seed: int, split: str, *, mix: Optional[dict] = None) -> list[dict]:
    """``n`` problems (with their ``clip`` plans) of one split, without synthesising any audio.
    Depends only on (n, seed, split, mix)."""
    mix = dict(mix or DEFAULT_MIX)
    unknown = set(mix) - set(_INFO)
    if unknown:
        raise ValueError(f"unknown question categories {sorted(unknown)}; valid: {', '.join(_INFO)}")
    rng = random.Random(f"pill-synth-audio:{seed}:{split}")
    deck = _Deck(random.Random(f"pill-synth-audio-decks:{seed}:{split}"))
    from .synth import deal_categories

    return [_problem(rng, deck, split, c) for c in deal_categories(n, mix, rng)]


def _phrase(s: dict) -> str:
    if s["kind"] in ("digit", "word"):
        return f'a voice says "{s["text"]}"'
    if s["kind"] == "tone":
        register = "low" if s["midi"] < 60 else "middle" if s["midi"] < 72 else "high"
        return f"a {register} tone"
    if s["kind"] == "beeps":
        return "one beep" if s["count"] == 1 else f"{COUNT_WORDS[s['count']]} beeps"
    return "a burst of noise"


def describe(clip: dict) -> str:
    """The clip's segments in order, as one sentence ("A voice says "four", then two beeps.")."""
    text = ", then ".join(_phrase(s) for s in clip["segments"])
    return f"{text[0].upper()}{text[1:]}."


# -- what a perfect listener hears -------------------------------------------------------------

def heard_answer(category: str, clip: dict) -> str:
    """The answer text a listener who hears ``clip`` perfectly gives to ``category``'s question."""
    segs = clip["segments"]
    if category == "digit":
        return [s["text"] for s in segs if s["kind"] == "digit"][1]
    if category == "tone":
        a, b = [s["midi"] for s in segs if s["kind"] == "tone"][:2]
        return "yes" if b > a else "no"
    if category == "beeps":
        return str(next(s["count"] for s in segs if s["kind"] == "beeps"))
    if category == "order":
        first = next(s["kind"] for s in segs if s["kind"] in ("word", "tone"))
        return f"the {first}"
    raise ValueError(f"unknown question category {category!r}")


def shuffled_audio_baseline(problems: dict[str, dict], qids: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Accuracy of a perfect listener on ``qids`` given its own clip (``own_clip``, which must be
    1.0) and given the clip of another problem of the same category (``shuffled_clip``, which must
    stay near ``chance``); a heard answer that is not an option is a uniform guess."""
    rng = random.Random(f"pill-synth-audio-shuffle:{seed}")
    by_cat: dict[str, list[str]] = {}
    for q in qids:
        by_cat.setdefault(problems[q]["category"], []).append(q)
    own = shuffled = chance = 0.0
    for cat, group in by_cat.items():
        donors = list(group)
        while len(group) > 1 and any(a == b for a, b in zip(group, donors)):  # a random derangement
            rng.shuffle(donors)
        for q, d in zip(group, donors):
            p = problems[q]
            chance += 1 / len(p["choices"])
            own += p["choices"].index(heard_answer(cat, p["clip"])) == p["answer"]
            heard = heard_answer(cat, problems[d]["clip"])
            guess = p["choices"].index(heard) if heard in p["choices"] else rng.randrange(len(p["choices"]))
            shuffled += guess == p["answer"]
    n = max(1, len(qids))
    return {"chance": chance / n, "own_clip": own / n, "shuffled_clip": shuffled / n}


# -- rendering ---------------------------------------------------------------------------------

def espeak_binary() -> str:
    """The espeak-ng executable; PillError says how to install it when there is none."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise PillError("espeak-ng is not installed; the audio benchmark speaks with it: run `sudo bash "
                        ".ci/install-espeak` (Debian/Ubuntu: apt-get install espeak-ng)")
    return path


class Renderer:
    """Segments -> 16 kHz float32 samples; spoken words are synthesised once per (text, voice)."""

    def __init__(self):
        self.espeak = espeak_binary()
        self._speech: dict[tuple, np.ndarray] = {}

    def _render(self, key: tuple) -> np.ndarray:
        import soundfile as sf

        from .audio import resample

        text, voice, pitch, speed = key
        run = subprocess.run([self.espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text],
                             capture_output=True, check=False)
        if run.returncode != 0 or not run.stdout:
            raise PillError(f"espeak-ng -v {voice} failed on {text!r}: {run.stderr.decode(errors='replace')[:200]}")
        data, rate = sf.read(io.BytesIO(run.stdout), dtype="float32", always_2d=True)
        x = resample(data.mean(axis=1), rate)
        loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
        x = x[loud[0]:loud[-1] + 1] if loud.size else x  # trim the silence espeak leaves around a word
        return (x / max(1e-6, float(np.abs(x).max()))).astype(np.float32)

    def speech(self, text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
        key = (text, voice, pitch, speed)
        if key not in self._speech:
            self._speech[key] = self._render(key)
        return self._speech[key]

    def prefetch(self, clips: Iterable[dict], workers: Optional[int] = None, progress: bool = False) -> int:
        """Synthesise every spoken segment of ``clips`` not yet rendered, ``workers`` espeak-ng processes
        at a time (default: one per CPU core); returns how many were rendered. The result is the same
        as rendering them one by one: each is its own espeak-ng run."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        keys = sorted({(s["text"], s["voice"], s["pitch"], s["speed"]) for c in clips for s in c["segments"]
                       if s["kind"] in ("digit", "word")} - set(self._speech))
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            rendered = pool.map(self._render, keys)
            for key, x in tqdm(zip(keys, rendered), desc="speech (espeak-ng)", total=len(keys), leave=False,
                               disable=None if progress else True):
                self._speech[key] = x
        return len(keys)

    def segment(self, s: dict) -> np.ndarray:
        if s["kind"] in ("digit", "word"):
            return 0.6 * self.speech(s["text"], s["voice"], s["pitch"], s["speed"])
        if s["kind"] == "tone":
            return _sine(440.0 * 2 ** ((s["midi"] - 69) / 12), s["seconds"], s["amp"])
        if s["kind"] == "beeps":
            beep, gap = _sine(s["freq"], 0.06, s["amp"]), np.zeros(int(0.09 * SAMPLE_RATE), np.float32)
            return np.concatenate(sum(([beep, gap] for _ in range(s["count"])), [])[:-1])
        n = int(s["seconds"] * SAMPLE_RATE)
        noise = np.random.default_rng(s["seed"]).normal(0.0, s["amp"], n).astype(np.float32)
        return noise * _fade(n)

    def clip(self, clip: dict) -> np.ndarray:
        parts = [np.zeros(int(clip["gaps"][0] * SAMPLE_RATE), np.float32)]
        for s, gap in zip(clip["segments"], clip["gaps"][1:]):
            parts += [self.segment(s), np.zeros(int(gap * SAMPLE_RATE), np.float32)]
        x = np.concatenate(parts)
        if len(x) > MAX_CLIP_SECONDS * SAMPLE_RATE:
            raise PillError(f"a synthesised clip is {len(x) / SAMPLE_RATE:.2f} s, above {MAX_CLIP_SECONDS} s "
                            f"({describe(clip)})")
        return x


def _fade(n: int, ms: float = 10.0) -> np.ndarray:
    k = min(n // 2, int(ms * SAMPLE_RATE / 1000))
    w = np.ones(n, np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k, dtype=np.float32))
    w[:k], w[n - k:] = ramp, ramp[::-1]
    return w


def _sine(freq: float, seconds: float, amp: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32) * _fade(n)


def make_synth_audio(out_dir: Union[str, Path], n_train: int, n_test: int, seed: int = 0, *,
                     n_val: Optional[int] = None, mix: Optional[dict] = None, progress: bool = True) -> dict[str, Any]:
    """Write the audio benchmark to ``out_dir`` in the ScienceQA layout (module docstring).

    Returns a summary: path, split sizes, category counts, the text-only baselines
    (:func:`~pill.data.synth.text_baseline`) and the listener baselines
    (:func:`shuffled_audio_baseline`) of the test split, the voices and semitones per split.
    """
    from tqdm.auto import tqdm

    from .audio import encode_wav
    from .synth import _write, text_baseline

    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_val", n_val)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    renderer = Renderer()  # fails first when espeak-ng is missing
    out = Path(out_dir)
    n_val = n_test if n_val is None else n_val
    problems: dict[str, dict] = {}
    pid_splits: dict[str, list[str]] = {}
    next_id = 1
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        pid_splits[split] = []
        for p in plan_split(n, seed, split, mix=mix):
            qid = str(next_id)
            next_id += 1
            problems[qid] = {**p, "split": split}
            pid_splits[split].append(qid)
    renderer.prefetch((p["clip"] for p in problems.values()), progress=progress)
    for qid, p in tqdm(problems.items(), desc="synthesising", total=len(problems), disable=None if progress else True,
                       leave=False):
        _write(out / "audio" / p["split"] / qid / "clip.wav", encode_wav(renderer.clip(p["clip"]), SAMPLE_RATE))
    captions = {qid: describe(p["clip"]) for qid, p in problems.items()}
    rng = random.Random(f"pill-synth-audio-captions:{seed}")
    llava = []
    for qid in pid_splits["train"]:
        prompt = rng.choice(CAPTION_PROMPTS)
        human = f"<audio>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<audio>"
        llava.append({"id": qid, "audio": f"train/{qid}/clip.wav",
                      "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": captions[qid]}]})
    info = {"generator": "pill.data.synth_audio", "version": GENERATOR_VERSION, "seed": seed,
            "sample_rate": SAMPLE_RATE, "max_clip_seconds": MAX_CLIP_SECONDS, "mix": dict(mix or DEFAULT_MIX),
            "splits": {k: len(v) for k, v in pid_splits.items()},
            "categories": dict(sorted(Counter(p["category"] for p in problems.values()).items())),
            "text_baseline": text_baseline(problems, pid_splits["train"], pid_splits["test"]),
            "listener_baseline": shuffled_audio_baseline(problems, pid_splits["test"], seed),
            "voices": {s: {"accents": list(ACCENTS[_pool(s)]), "variants": list(VARIANTS[_pool(s)]),
                           "speaker_pitches": list(SPEAKER_PITCHES[_pool(s)]),
                           "semitones": [note_name(m) for m in SEMITONES[_pool(s)]]} for s in ("train", "test")},
            "llava_captions": "captions_llava.json (audio paths relative to audio/)"}
    dump = lambda obj: json.dumps(obj, indent=1, ensure_ascii=False) + "\n"  # noqa: E731
    _write(out / "problems.json", dump(problems))
    _write(out / "pid_splits.json", dump(pid_splits))
    _write(out / "captions.json", dump({"captions": captions}))
    _write(out / "captions_llava.json", dump(llava))
    _write(out / "synth_info.json", dump(info))
    return {"path": str(out), **info}


__all__ = ["make_synth_audio", "plan_split", "describe", "heard_answer", "shuffled_audio_baseline", "Renderer",
           "espeak_binary", "note_name"]
