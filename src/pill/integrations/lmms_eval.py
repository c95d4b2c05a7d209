"""A pill model for lmms-eval: ``lmms-eval --model pill --model_args run=RUN --tasks TASKS``.

lmms-eval finds the model through the ``lmms_eval.models`` entry point that pill's package
declares (``pip install 'pill[lmms-eval]'``; :func:`model_manifest`). It is a "simple" lmms-eval
model: each request carries the task's prompt text and a function that returns the document's
images.

- ``generate_until``: the answer of :class:`pill.chat.ChatSession` (the one chat path of pill:
  the run's chat template and system prompt, images placed before the text), cut at the first
  ``until`` string; ``max_new_tokens``, ``temperature``, ``top_p`` come from the task.
- ``loglikelihood``: ``log P(continuation | prompt)`` summed over the continuation's tokens after
  the rendered chat prompt, and whether greedy decoding would produce exactly those tokens.

``run`` is a run folder or a Hub repository id (:func:`pill.build.load_run`); without lmms-eval
installed the class still works on request objects with ``.args`` (tests use that).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ..errors import ConfigError, PillError

MODEL_ID = "pill"


def _base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        return object
    return lmms


def model_manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`PillLMMS` as model ``pill``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.PillLMMS")


class PillLMMS(_base()):
    """lmms-eval's view of a trained pill run.

    Args (``--model_args key=value,...``): ``run`` (required), ``device`` (default: cuda when
    available), ``max_new_tokens`` (default 256, when the task sets none), ``batch_size`` (accepted;
    requests are answered one at a time, as the chat path does).
    """

    is_simple = True

    def __init__(self, run: Optional[str] = None, device: Optional[str] = None, max_new_tokens: int | str = 256,
                 batch_size: int | str = 1, vlm=None, **unused: Any):
        if _base() is not object:
            super().__init__()
        else:
            self._rank, self._world_size, self.task_dict = 0, 1, {}
        if vlm is None:
            if not run:
                raise ConfigError("lmms-eval --model_args: run=RUN_DIR (a pill run folder or Hub id) is required")
            import torch

            from ..build import load_run

            vlm = load_run(run, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vlm = vlm.eval()
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)

    @property
    def device(self):
        return self.vlm.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images = []
        for v in visuals:
            if isinstance(v, (list, tuple)):
                images.extend(v)
            else:
                images.append(v)
        return [v for v in images if v is not None]

    # -- the two request types --------------------------------------------------------------

    def generate_until(self, requests: Sequence) -> list[str]:
        """``request.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> answers."""
        from ..chat import ChatSession

        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen = dict(gen_kwargs or {})
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen.get("temperature", 0.0) or 0.0) if gen.get("do_sample", True) else 0.0
            session = ChatSession(self.vlm, max_new_tokens=int(gen.get("max_new_tokens") or self.max_new_tokens),
                                  temperature=temperature, top_p=float(gen.get("top_p") or 1.0))
            text = session.ask(context, self._images(doc_to_visual, task, split, doc_id))
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence) -> list[tuple[float, bool]]:
        """``request.args = (context, doc_to_target, doc_to_visual, doc_id, task, split)`` ->
        ``(sum of log P(continuation tokens), greedy)`` per request; ``doc_to_target`` is the
        continuation text or a function of the document that returns it."""
        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            out.append(self.score(context, str(continuation), self._images(doc_to_visual, task, split, doc_id)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise PillError("lmms-eval multi-round generation is not supported by the pill model; "
                        "use a single-round task")

    # -- scoring ----------------------------------------------------------------------------

    def score(self, context: str, continuation: str, images: Sequence = ()) -> tuple[float, bool]:
        """``(log P(continuation | chat prompt of context and images), greedy?)`` in one forward pass."""
        import torch

        from ..data.prompts import render_chat

        vlm = self.vlm
        placeholder = vlm.modalities["image"].placeholder
        missing = len(images) - context.count(placeholder)
        if missing > 0:
            context = f"{placeholder}\n" * missing + context
        system = getattr(vlm, "system_prompt", None)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": context}]
        prompt = render_chat(vlm.tokenizer, messages, add_generation_prompt=True)
        load = vlm.modalities["image"].load  # paths and encoded bytes are read; decoded (PIL) images pass through
        decoded = [load(i) if isinstance(i, (str, bytes, bytearray, os.PathLike)) else i for i in images]
        n_prompt = int(vlm.processor([prompt], [decoded])["input_ids"].shape[1])
        batch = vlm.processor([prompt + continuation], [decoded])
        ids = batch["input_ids"]  # (1, T)
        n_cont = ids.shape[1] - n_prompt
        if n_cont < 1:
            raise PillError(f"lmms-eval loglikelihood: the continuation {continuation!r} adds no token to the prompt")
        inputs = {k: v.to(vlm.device) for k, v in batch.items() if torch.is_tensor(v)}
        with torch.no_grad():
            logits = vlm(**inputs, logits="all").logits[0, n_prompt - 1:-1].float()  # (n_cont, V)
        logp = torch.log_softmax(logits, dim=-1)
        target = ids[0, n_prompt:].to(logp.device)  # (n_cont,)
        total = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy


__all__ = ["PillLMMS", "model_manifest", "MODEL_ID"]
