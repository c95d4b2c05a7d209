"""Text with ``<image>`` placeholders + images -> input ids, visual-token slots, modality ids.

Each ``<image>`` in a text becomes ``num_image_tokens`` slot tokens (modality 1).
The slot ids are placeholders: :class:`pill.vlm.PillVLM` overwrites their
embeddings with the projected visual tokens, in the order the images occur.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import DataError

IMAGE_PLACEHOLDER = "<image>"
TEXT, IMAGE = 0, 1


@dataclass
class Encoded:
    """One tokenised sample. ``labels`` uses -100 for positions without loss."""

    input_ids: list[int]
    modality_ids: list[int]
    labels: Optional[list[int]] = None
    num_images: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class PillProcessor:
    """Tokenises interleaved text/image prompts for a :class:`~pill.vlm.PillVLM`.

    Args:
        tokenizer: the LLM's Hugging Face tokenizer.
        num_image_tokens: K, visual tokens per image (the VPG's output length).
        preprocess: ``list[PIL.Image] -> (N, 3, H, W)`` float tensor (the VPG's preprocessing).
        image_token_id: id written in the slots (default: unk, else pad, else 0).
    """

    def __init__(self, tokenizer, num_image_tokens: int, preprocess: Optional[Callable] = None,
                 image_token_id: Optional[int] = None):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.preprocess = preprocess
        if image_token_id is None:
            image_token_id = next((t for t in (tokenizer.unk_token_id, tokenizer.pad_token_id) if t is not None), 0)
        self.image_token_id = image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- text --------------------------------------------------------------------------
    def tokenize(self, text: str) -> Encoded:
        """Tokenise ``text`` (no special tokens added); each ``<image>`` -> K slots of modality 1."""
        ids: list[int] = []
        mods: list[int] = []
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if piece:
                toks = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                mods += [TEXT] * len(toks)
            if i < len(pieces) - 1:
                ids += [self.image_token_id] * self.num_image_tokens
                mods += [IMAGE] * self.num_image_tokens
        return Encoded(ids, mods, num_images=len(pieces) - 1)

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` ({role, content}) with the tokenizer's chat template."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        text = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages)
        return text + ("ASSISTANT:" if add_generation_prompt else "")

    # -- batches -----------------------------------------------------------------------
    def pad(self, samples: Sequence[Encoded], side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest sample. Returns input_ids, attention_mask, modality_ids (B, T) [+ labels]."""
        T = max(len(s) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        mods = torch.zeros((B, T), dtype=torch.long)
        has_labels = all(s.labels is not None for s in samples)
        labels = torch.full((B, T), -100, dtype=torch.long) if has_labels else None
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

    def __call__(self, texts: Sequence[str] | str, images: Optional[Sequence[Sequence]] = None,
                 side: str = "left", sample_ids: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Batch ``texts`` (with ``<image>`` placeholders) and their images.

        Args:
            texts: B strings. ``images[b]`` lists the PIL images of ``texts[b]``, in order.
            side: padding side; ``left`` for generation.
            sample_ids: names used in error messages (default: the batch index).
        Returns input_ids, attention_mask, modality_ids (B, T) and, when there are
        images, pixel_values (N_images, 3, H, W) in order of occurrence.
        """
        if isinstance(texts, str):
            texts = [texts]
            images = [images] if images is not None and (not images or not isinstance(images[0], (list, tuple))) else images
        images = images if images is not None else [[] for _ in texts]
        if len(images) != len(texts):
            raise DataError(f"got {len(texts)} texts but {len(images)} image lists")
        encoded, flat = [], []
        for b, (text, imgs) in enumerate(zip(texts, images)):
            enc = self.tokenize(text)
            if enc.num_images != len(imgs):
                name = sample_ids[b] if sample_ids is not None else b
                raise DataError(
                    f"sample {name}: {enc.num_images} {IMAGE_PLACEHOLDER} placeholder(s) but {len(imgs)} image(s)"
                )
            encoded.append(enc)
            flat.extend(imgs)
        batch = self.pad(encoded, side)
        if flat:
            if self.preprocess is None:
                raise ValueError("this processor has no image preprocessing (no VPG attached)")
            batch["pixel_values"] = self.preprocess(flat)
        return batch
