"""Text with modality placeholders + inputs -> input ids, slot tokens, modality ids.

Each placeholder of a registered modality (``<image>``, :mod:`pill.modalities`) becomes that
modality's ``num_tokens`` slot tokens, carrying its modality id. The slot ids are placeholders:
:class:`pill.vlm.PillVLM` overwrites their embeddings with the projected encoder tokens, in the
order the inputs of each modality occur.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import DataError, PillError
from .modalities import IMAGE, IMAGE_MODALITY, IMAGE_PLACEHOLDER, TEXT, Modality

IGNORE_INDEX = -100  # label of positions without loss (the value torch's cross-entropy skips)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "TEXT", "IMAGE", "Encoded", "InputSlots", "PillProcessor"]


class Encoded:
    """One tokenised sample. ``labels`` uses :data:`IGNORE_INDEX` for positions without loss;
    ``num_inputs`` counts the inputs per modality id (``num_images``: those of the image)."""

    __slots__ = ("input_ids", "modality_ids", "labels", "num_inputs")

    def __init__(self, input_ids: list[int], modality_ids: list[int], labels: Optional[list[int]] = None,
                 num_images: Optional[int] = None, num_inputs: Optional[dict[int, int]] = None):
        self.input_ids = input_ids
        self.modality_ids = modality_ids
        self.labels = labels
        self.num_inputs = dict(num_inputs or {})
        if num_images is not None:
            self.num_inputs[IMAGE] = num_images

    @property
    def num_images(self) -> int:
        return self.num_inputs.get(IMAGE, 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, Encoded) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return f"Encoded(len={len(self)}, num_inputs={self.num_inputs})"


@dataclass(frozen=True)
class InputSlots:
    """How one modality's inputs appear in a prompt: ``num_tokens`` slots each, and how a list of
    decoded inputs becomes the encoder's batch (``preprocess``)."""

    modality: Modality
    num_tokens: int
    preprocess: Optional[Callable[[list], torch.Tensor]] = None


class PillProcessor:
    """Tokenises interleaved text / image / other-modality prompts for a :class:`~pill.vlm.PillVLM`.

    Args:
        tokenizer: the LLM's Hugging Face tokenizer.
        num_image_tokens, preprocess: K visual tokens per image and ``list[PIL.Image] -> (N, 3, H, W)``
            (the image encoder's); a shorthand for ``slots={"image": InputSlots(...)}``.
        slots: modality name -> :class:`InputSlots`, for every modality the model reads.
        image_token_id: id written in the slots (default: unk, else pad, else 0).
    """

    def __init__(self, tokenizer, num_image_tokens: Optional[int] = None, preprocess: Optional[Callable] = None,
                 image_token_id: Optional[int] = None, *, slots: Optional[dict[str, InputSlots]] = None):
        self.tokenizer = tokenizer
        self.slots: dict[str, InputSlots] = dict(slots or {})
        if num_image_tokens is not None:
            self.slots["image"] = InputSlots(IMAGE_MODALITY, num_image_tokens, preprocess)
        if image_token_id is None:
            image_token_id = next((t for t in (tokenizer.unk_token_id, tokenizer.pad_token_id) if t is not None), 0)
        self.image_token_id = image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._by_placeholder = {s.modality.placeholder: s for s in self.slots.values()}
        self._split = re.compile("(" + "|".join(re.escape(p) for p in self._by_placeholder) + ")") \
            if self._by_placeholder else None

    # -- the image modality, by its usual names ----------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.slots["image"].num_tokens if "image" in self.slots else 0

    @property
    def preprocess(self) -> Optional[Callable]:
        return self.slots["image"].preprocess if "image" in self.slots else None

    def tokens_of(self, modality_id: int) -> int:
        """Slot tokens per input of the modality ``modality_id``."""
        return next(s.num_tokens for s in self.slots.values() if s.modality.id == modality_id)

    # -- text --------------------------------------------------------------------------
    def tokenize(self, text: str) -> Encoded:
        """Tokenise ``text`` (no special tokens added); each placeholder -> K slots of its modality."""
        ids: list[int] = []
        mods: list[int] = []
        counts: dict[int, int] = {}
        pieces = self._split.split(text) if self._split is not None else [text]
        for piece in pieces:
            slot = self._by_placeholder.get(piece)
            if slot is not None:
                mid = slot.modality.id
                ids += [self.image_token_id] * slot.num_tokens
                mods += [mid] * slot.num_tokens
                counts[mid] = counts.get(mid, 0) + 1
            elif piece:
                toks = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                mods += [TEXT] * len(toks)
        return Encoded(ids, mods, num_inputs=counts)

    # -- batches -----------------------------------------------------------------------
    def pad(self, samples: Sequence[Encoded], side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest sample. Returns input_ids, attention_mask, modality_ids (B, T) [+ labels]."""
        T = max(len(s) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        mods = torch.zeros((B, T), dtype=torch.long)
        has_labels = all(s.labels is not None for s in samples)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for b, s in enumerate(samples):
            n = len(s)
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            input_ids[b, sl] = torch.tensor(s.input_ids)
            attention[b, sl] = 1
            mods[b, sl] = torch.tensor(s.modality_ids)
            if labels is not None:
                labels[b, sl] = torch.tensor(s.labels)
        out = {"input_ids": input_ids, "attention_mask": attention, "modality_ids": mods}
        if labels is not None:
            out["labels"] = labels
        return out

    def preprocess_inputs(self, name: str, decoded: list) -> torch.Tensor:
        """Decoded inputs of modality ``name`` -> its encoder's batch tensor."""
        slot = self.slots.get(name)
        if slot is None or slot.preprocess is None:
            raise PillError(f"this processor has no {name} preprocessing (no {name} encoder attached)")
        return slot.preprocess(decoded)

    def __call__(self, texts: Sequence[str] | str, images: Optional[Sequence[Sequence]] = None,
                 side: str = "left", sample_ids: Optional[Sequence[str]] = None,
                 inputs: Optional[Sequence[dict[str, Sequence]]] = None) -> dict[str, torch.Tensor]:
        """Batch ``texts`` (with placeholders) and their inputs.

        Args:
            texts: B strings. ``images[b]`` lists the decoded (PIL) images of ``texts[b]``, in order;
                ``inputs[b]`` maps other modality names to their decoded inputs, in order.
            side: padding side; ``left`` for generation.
            sample_ids: names used in error messages (default: the batch index).
        Returns input_ids, attention_mask, modality_ids (B, T) and, per modality with inputs, its
        preprocessed batch under the modality's ``inputs_key`` (``pixel_values`` (N, 3, H, W)) in
        order of occurrence.
        """
        if isinstance(texts, str):
            texts = [texts]
            images = [images] if images is not None and (not images or not isinstance(images[0], (list, tuple))) else images
            inputs = [inputs] if isinstance(inputs, dict) else inputs
        images = images if images is not None else [[] for _ in texts]
        inputs = inputs if inputs is not None else [{} for _ in texts]
        if len(images) != len(texts) or len(inputs) != len(texts):
            raise DataError(f"got {len(texts)} texts but {len(images)} image lists and {len(inputs)} input maps")
        encoded, flat = [], {name: [] for name in self.slots}
        for b, (text, imgs, more) in enumerate(zip(texts, images, inputs)):
            enc = self.tokenize(text)
            per = dict(more)
            if imgs:
                per["image"] = list(imgs)
            for name in set(per) | set(self.slots):
                slot = self.slots.get(name)
                if slot is None:
                    raise DataError(f"sample {sample_ids[b] if sample_ids is not None else b}: "
                                    f"this model reads no {name} inputs")
                have, want = len(per.get(name, [])), enc.num_inputs.get(slot.modality.id, 0)
                if have != want:
                    sid = sample_ids[b] if sample_ids is not None else b
                    raise DataError(f"sample {sid}: {want} {slot.modality.placeholder} placeholder(s) but "
                                    f"{have} {slot.modality.label}(s)")
                flat[name].extend(per.get(name, []))
            encoded.append(enc)
        batch = self.pad(encoded, side)
        for name, items in flat.items():
            if items:
                batch[self.slots[name].modality.inputs_key] = self.preprocess_inputs(name, items)
        return batch
