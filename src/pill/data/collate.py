"""Samples -> token ids with loss on the assistant turns only -> padded batches.

Labels are found with the model's own chat template: for every assistant turn the
conversation is rendered up to the turn (with the generation prompt) and through the
turn; the text in between is the answer. The answer and the special token that closes
it (``<|im_end|>``, ``</s>``, ...) get labels; everything else, image slots included,
gets -100. Text segments are tokenised separately, so the prompt tokens are exactly
those :func:`encode_prompt` produces at inference time.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import ConfigError, DataError
from ..modalities import TEXT, modalities, modality, modality_by_id
from ..processor import IGNORE_INDEX, Encoded
from . import BadSample, LoadReport, Sample, image_key
from .prompts import render_chat, resolve_template


class SampleTooLong(BadSample):
    """The sample does not fit ``max_length`` (or truncation would leave no answer token)."""

    def __init__(self, message: str):
        super().__init__(message, "too_long")


def _special_strings(tokenizer) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok))
    names.difference_update(m.placeholder for m in modalities())
    return sorted((n for n in names if n), key=len, reverse=True)


def _label_span(region: str, content: str, specials: Sequence[str]) -> tuple[int, int]:
    """(start, end) of the labelled part of one rendered assistant turn ``region``."""
    text = content.strip()
    idx = region.rfind(text) if text else -1  # rfind: a header before the answer may contain the same words
    if idx < 0:  # the template rewrote the answer: label the whole turn but trailing whitespace
        return 0, len(region.rstrip())
    start = 0 if not region[:idx].strip() else idx  # a lone leading space belongs to the first answer token
    after = idx + len(text)
    hits = [(region.find(s, after), -len(s)) for s in specials if region.find(s, after) >= 0]
    if not hits:
        return start, len(region.rstrip())
    pos, neg_len = min(hits)
    return start, pos - neg_len


def chat_segments(messages: Sequence[dict], tokenizer, template: Optional[str] = None,
                  name: str = "sample") -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_label)`` pieces (answers are labels)."""
    tpl = resolve_template(tokenizer, template)
    full = render_chat(tokenizer, messages, tpl)
    specials = _special_strings(tokenizer)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not any(x["role"] == "user" for x in messages[:i]):
            raise BadSample(f"{name}: an assistant turn comes before any user turn", "bad_field")
        prefix = render_chat(tokenizer, messages[:i], tpl, add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], tpl)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise DataError(f"{name}: the chat template does not render conversations prefix by prefix, "
                            "so the answer tokens cannot be located; pass template='llama-2' or 'chatml'")
        start, end = _label_span(upto[len(prefix):], m["content"], specials)
        segments.append((full[pos:len(prefix) + start], False))
        segments.append((upto[len(prefix) + start:len(prefix) + end], True))
        pos = len(prefix) + end
    segments.append((full[pos:], False))
    return [(t, lab) for t, lab in segments if t]


def encode_sample(sample: Sample, processor, max_length: Optional[int], *, template: Optional[str] = None,
                  truncate: bool = True) -> Encoded:
    """Token ids, modality ids and labels of one sample, in the model's chat template.

    ``template``: default the sample's own (``meta["template"]``, set by a loader for a prompt
    style), else the tokenizer's. Labels are -100 except on the assistant answers and their
    end-of-turn token.
    Longer than ``max_length``: cut from the right, never inside an image's K slots
    (an image cut off is dropped: ``num_images`` shrinks), keeping at least one answer
    token. Raises SampleTooLong (a DataError) when that is impossible or ``truncate``
    is False, and BadSample when placeholders and images disagree.
    Returns Encoded with ``len <= max_length``.
    """
    name = f"sample {sample.id}"
    template = template if template is not None else sample.meta.get("template")
    ids: list[int] = []
    mods: list[int] = []
    labels: list[int] = []
    starts: list[tuple[int, int, int]] = []  # (position, modality id, slot tokens) of each input
    for text, is_label in chat_segments(sample.messages, processor.tokenizer, template, name):
        enc = processor.tokenize(text)
        if is_label and enc.num_inputs:
            placeholder = modality_by_id(next(iter(enc.num_inputs))).placeholder
            raise BadSample(f"{name}: {placeholder} in an assistant turn", "placeholder_mismatch")
        j = 0
        while j < len(enc):
            mid = enc.modality_ids[j]
            if mid != TEXT:
                k = processor.tokens_of(mid)
                starts.append((len(ids) + j, mid, k))
                j += k
            else:
                j += 1
        ids += enc.input_ids
        mods += enc.modality_ids
        labels += enc.input_ids if is_label else [IGNORE_INDEX] * len(enc)
    have = sample.inputs()
    for m in {modality(n) for n in have} | {modality_by_id(mid) for _, mid, _ in starts}:
        n_slots = sum(1 for _, mid, _ in starts if mid == m.id)
        if n_slots != len(have.get(m.name, [])):
            raise BadSample(f"{name}: {n_slots} {m.placeholder} placeholder(s) but {len(have.get(m.name, []))} "
                            f"{m.label}(s)", "placeholder_mismatch")
    if all(x == IGNORE_INDEX for x in labels):
        raise BadSample(f"{name}: no assistant answer to learn from", "no_answer")
    if max_length is not None and len(ids) > max_length:
        if not truncate:
            raise SampleTooLong(f"{name}: {len(ids)} tokens, above max_length {max_length}")
        cut = max_length
        for s, _, k in starts:
            if s < cut < s + k:
                cut = s
        if all(x == IGNORE_INDEX for x in labels[:cut]):
            raise SampleTooLong(f"{name}: {len(ids)} tokens; cutting to max_length {max_length} "
                                "would remove the whole answer")
        ids, mods, labels = ids[:cut], mods[:cut], labels[:cut]
        starts = [st for st in starts if st[0] + st[2] <= cut]  # an input cut off is dropped
    counts: dict[int, int] = {}
    for _, mid, _ in starts:
        counts[mid] = counts.get(mid, 0) + 1
    return Encoded(ids, mods, labels, num_inputs=counts)


def encode_prompt(messages: Sequence[dict], processor, *, template: Optional[str] = None) -> Encoded:
    """The generation prompt for ``messages`` (ending with a user turn), without labels."""
    if messages and messages[-1]["role"] == "assistant":
        raise DataError("the prompt ends with an assistant turn; pass the messages before the answer "
                        "(e.g. sample.messages[:-1])")
    text = render_chat(processor.tokenizer, messages, template, add_generation_prompt=True)
    return processor.tokenize(text)


def prompt_items(samples: Sequence[Sample], processor, *, template: Optional[str] = None) -> list[dict]:
    """Collator items for generation: each sample's messages before its last answer, rendered with
    ``template`` (default: the sample's own, ``meta["template"]``, else the tokenizer's)."""
    items = []
    for s in samples:
        messages = s.messages[:-1] if s.messages and s.messages[-1]["role"] == "assistant" else s.messages
        own = template if template is not None else s.meta.get("template")
        items.append({"id": s.id, "encoded": encode_prompt(messages, processor, template=own),
                      "inputs": s.inputs()})
    return items


class PillDataset(torch.utils.data.Dataset):
    """Samples tokenised once, reused every epoch.

    Items are ``{"id", "encoded": Encoded, "inputs": {modality name: [refs]}}`` for :class:`Collator`.

    Args:
        on_overflow: ``"skip"`` samples that cannot fit ``max_length`` (counted in
            ``report``) or ``"error"``.
        skip_bad: skip other malformed samples (placeholder/image mismatch) instead of raising.
        wrong_answer_p, seed: random-wrong-answer augmentation for ScienceQA samples,
            re-drawn for each epoch given to :meth:`set_epoch` (depends on seed, epoch and
            sample id only). Each variant is tokenised once, when first drawn.
    """

    def __init__(self, samples: Sequence[Sample], processor, max_length: Optional[int], *,
                 template: Optional[str] = None, truncate: bool = True, on_overflow: str = "skip",
                 skip_bad: bool = False, wrong_answer_p: float = 0.0, seed: int = 0, progress: bool = True):
        if on_overflow not in ("skip", "error"):
            raise ConfigError(f"on_overflow: must be 'skip' or 'error', got {on_overflow!r}")
        if not 0.0 <= wrong_answer_p <= 1.0:
            raise ConfigError(f"wrong_answer_p: must be in [0, 1], got {wrong_answer_p!r}")
        self.processor = processor
        self.max_length = max_length
        self.template = template
        self.truncate = truncate
        self.wrong_answer_p = wrong_answer_p
        self.seed = seed
        self.epoch = 0
        self.samples: list[Sample] = []
        self.encoded: list[Encoded] = []
        self._variants: dict[tuple[int, int], Optional[Encoded]] = {}
        source = getattr(getattr(samples, "report", None), "source", "samples")
        self.report = LoadReport(source=f"{source} (tokenised, max_length {max_length})")

        from tqdm.auto import tqdm

        for s in tqdm(samples, desc="tokenising", disable=None if progress else True, leave=False):
            self.report.total += 1
            try:
                enc = encode_sample(s, processor, max_length, template=template, truncate=truncate)
            except SampleTooLong as e:
                if on_overflow == "error":
                    raise
                self.report.skip(e.reason, str(e))
                continue
            except BadSample as e:
                if not skip_bad:
                    raise
                self.report.skip(e.reason, str(e))
                continue
            self.samples.append(s)
            self.encoded.append(enc)
        self.report.kept = len(self.samples)
        self.report.counts = {"truncated": sum(len(e) == max_length for e in self.encoded) if max_length else 0}
        self.report.print_if_skipped()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose wrong answers ``__getitem__`` returns (call before iterating)."""
        self.epoch = epoch

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.encoded]

    def __len__(self) -> int:
        return len(self.samples)

    def _encoded_for_epoch(self, i: int) -> Encoded:
        from .scienceqa import wrong_answer_variant

        variant = wrong_answer_variant(self.samples[i], self.seed, self.epoch, self.wrong_answer_p)
        if variant is self.samples[i]:
            return self.encoded[i]
        key = (i, variant.meta["target_answer"])
        if key not in self._variants:
            try:
                self._variants[key] = encode_sample(variant, self.processor, self.max_length,
                                                    template=self.template, truncate=self.truncate)
            except SampleTooLong:
                self._variants[key] = None
        return self._variants[key] or self.encoded[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        enc = self._encoded_for_epoch(i)
        s = self.samples[i]
        kept = {n: refs[: enc.num_inputs.get(modality(n).id, 0)] for n, refs in s.inputs().items()}
        return {"id": s.id, "encoded": enc, "inputs": {n: r for n, r in kept.items() if r}}


class LengthGroupedBatchSampler:
    """Batches of indices with similar lengths, to limit padding.

    With ``shuffle``: indices are shuffled (seed, epoch), cut into groups of
    ``batch_size * group_batches``, each group sorted by length and cut into batches,
    and the batch order shuffled again. Without: sorted by length, longest first.
    The global list of batches depends only on (lengths, seed, epoch); the training loop
    splits each global batch across the processes.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, group_batches: int = 50):
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The global list of batches for ``epoch`` (default: the one set by :meth:`set_epoch`)."""
        epoch = self.epoch if epoch is None else epoch
        n, B = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: (-self.lengths[i], i))
            out = [order[k:k + B] for k in range(0, n, B)]
        else:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(n))
            rng.shuffle(order)
            group = B * max(1, self.group_batches)
            out = []
            for g in range(0, n, group):
                chunk = sorted(order[g:g + group], key=lambda i: -self.lengths[i])
                out += [chunk[k:k + B] for k in range(0, len(chunk), B)]
            rng.shuffle(out)
        if self.drop_last:  # groups hold whole batches, so at most one batch is short
            out = [b for b in out if len(b) == B]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n, B = len(self.lengths), self.batch_size
        return n // B if self.drop_last else -(-n // B)


class Collator:
    """Items of :class:`PillDataset` (or :func:`prompt_items`) -> one padded batch.

    Returns input_ids, attention_mask, modality_ids, labels (B, T) (labels only when
    every item has them), ``ids`` (B sample ids) and, per modality with inputs in the batch
    (:mod:`pill.modalities`): under its ``refs_key`` (``image_keys``) one cache reference per
    input in order of occurrence (the path, or ``sha256:<hex>`` for bytes) and, when
    ``load_inputs`` is set and the processor can preprocess that modality, the preprocessed
    batch under its ``inputs_key`` (``pixel_values`` (N, 3, H, W)).
    """

    def __init__(self, processor, load_images: bool = True, max_pixels: Optional[int] = None,
                 padding_side: str = "right"):
        self.processor = processor
        self.load_inputs = load_images
        self.max_pixels = max_pixels
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = self.processor.pad([it["encoded"] for it in items], side=self.padding_side)
        refs: dict[str, list] = {}
        owners: dict[str, list] = {}
        for it in items:
            have = it.get("inputs", {})
            for name in set(have) | {modality_by_id(mid).name for mid in it["encoded"].num_inputs}:
                m = modality(name)
                n = it["encoded"].num_inputs.get(m.id, 0)
                if n != len(have.get(name, [])):
                    raise DataError(f"sample {it['id']}: {n} {m.label} slot group(s) but "
                                    f"{len(have.get(name, []))} {m.label}(s)")
            for name, r in have.items():
                refs.setdefault(name, []).extend(r)
                owners.setdefault(name, []).extend([it["id"]] * len(r))
        batch["ids"] = [it["id"] for it in items]
        for name, r in refs.items():
            m = modality(name)
            batch[m.refs_key] = [image_key(x) for x in r]
            slot = self.processor.slots.get(name)
            if self.load_inputs and slot is not None and slot.preprocess is not None:
                decoded = [self._load(m, x, owner) for x, owner in zip(r, owners[name])]
                batch[m.inputs_key] = slot.preprocess(decoded)
        return batch

    def _load(self, m, ref, owner: str):
        from .images import DEFAULT_MAX_PIXELS

        kw = {"max_pixels": self.max_pixels or DEFAULT_MAX_PIXELS} if m.name == "image" else {}
        try:
            return m.load(ref, name=None if isinstance(ref, str) else f"{m.label} bytes of sample {owner}", **kw)
        except DataError as e:
            raise DataError(f"sample {owner}: {e}") from None


def batch_refs(batch: dict) -> dict[str, list[str]]:
    """modality name -> the batch's cache references (``<name>_keys``) for the modalities it has."""
    return {m.name: batch[m.refs_key] for m in modalities() if batch.get(m.refs_key)}
