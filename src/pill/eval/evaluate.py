"""Evaluate a PILL model on ScienceQA: generate (or rank) answers, write predictions, score.

Two modes:

- ``generate``: batched greedy decoding with the KV cache (left-padded batches of
  similar length), then :func:`pill.eval.extract.extract_answer` reads the option.
  This is how the papers measure.
- ``likelihood``: no decoding. Every answer target starts with ``The answer is X.``
  (:func:`pill.data.prompts.build_target`), so every option's target shares the tokens
  of ``The answer is`` and first differs at the letter token. One forward pass per
  batch over ``prompt + "The answer is"`` gives, at its last position, the
  log-probability of each option's letter token::

      score(option c) = log P(letter_c | prompt, "The answer is")

  and the prediction is the option with the highest score. Because the shared prefix
  has the same probability for every option, this ranks the options exactly as
  ``log P("The answer is <letter_c>" | prompt)`` does; the tokens after the letter
  (``.``, the explanation, end of turn) are not scored. The prompt and the prefix are
  tokenised exactly as in training (:mod:`pill.data.collate`). For output formats that
  put the explanation before the answer (``LA``, ``EA``, ``LEA``, ``ELA``) the model
  was trained to write the explanation first, so this mode scores a continuation it
  was never trained on; a warning says so.

Two protocols (``protocol=``), both of which count the answers that could not be read:

- ``pill`` (default): the mode above, prompts in the run's prompt style; an unreadable answer
  (:func:`pill.eval.extract.extract_answer` finds no option) counts as wrong.
- ``reference``: what the reference PILL code's ``eval_sqa.py`` does. Prompts in the reference
  style (:func:`pill.data.prompts.scienceqa_messages`: its system message, ``Image:``/``Image:N/A.``,
  ``[INST] ... [/INST]``); sampling at temperature 0.1 with top-p 0.75 (seeded); up to 512 new
  tokens, the prompt and the answer together at most 512 tokens (``Generator.generate`` caps the
  sequence at ``max_seq_len``); the answer read with the regex ``The answer is ([A-Z]).`` (first
  hit in the decoded prompt + answer, as it decodes both); and, where that finds no option of the
  problem, a random option (``random.Random(seed)``, in split order) instead of a wrong answer.

Files written to ``out_dir``:

- ``predictions.json``: the official result format ``{"results": {qid: option_index}}``
  (-1 for an answer that could not be read, as LLaVA writes it), plus ``split``,
  ``prompt_format``, ``mode`` and ``count``;
- ``generations.jsonl``: per problem ``qid``, ``prompt`` (its last 300 characters),
  ``generation`` (the raw text; ``null`` in likelihood mode), ``option_logprobs``
  (likelihood mode), ``prediction`` (index or ``null``), ``answer`` and ``correct``;
- ``scores.json``: :func:`pill.eval.scienceqa_score.score` plus ``eval`` settings.
"""
from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..data.prompts import OPTION_LETTERS
from ..errors import ConfigError, PillError

MODES = ("generate", "likelihood")
PROTOCOLS = ("pill", "reference")
PROMPT_TAIL_CHARS = 300
# eval_sqa.py of the reference code: generation_temperature, top_p, max_gen_len, max_seq_len, the regex
REFERENCE_SAMPLING = {"temperature": 0.1, "top_p": 0.75, "max_new_tokens": 512, "max_length": 512}
REFERENCE_ANSWER = re.compile(r"The answer is ([A-Z]).")


def reference_answer(text: str, num_choices: int) -> Optional[int]:
    """The option index the reference's regex reads from ``text`` (its first hit), or None when it
    finds none or a letter past the last option (where the reference draws a random option)."""
    hits = REFERENCE_ANSWER.findall(text)
    if not hits:
        return None
    index = OPTION_LETTERS.find(hits[0])
    return index if 0 <= index < num_choices else None


def default_max_new_tokens(prompt_format: str) -> int:
    """8 tokens for the bare answer sentence (output ``A``), 256 when lectures/explanations are generated."""
    from ..data.prompts import parse_format

    _, output_format = parse_format(prompt_format)
    return 8 if output_format == "A" else 256


# -- likelihood ranking ---------------------------------------------------------------------

def answer_prefix(processor, template: Optional[str] = None,
                  letters: str = OPTION_LETTERS) -> tuple[list[int], list[int]]:
    """Token ids of the shared answer prefix and of each option letter, as training tokenises them.

    Renders a one-turn conversation whose answer is ``The answer is X.`` for every letter
    with the chat template, takes the answer's label text (:func:`pill.data.collate.chat_segments`)
    and tokenises it. Returns ``(prefix_ids, letter_ids)``: the longest common prefix of the
    letters' token sequences (``The answer is``) and the first token after it, one per letter.
    Raises PillError when two letters share that token (the tokenizer merges the letter with
    what follows), since ranking by one token is then impossible.
    """
    from ..data.collate import chat_segments

    sequences = []
    for letter in letters:
        messages = [{"role": "user", "content": "Question"},
                    {"role": "assistant", "content": f"The answer is {letter}."}]
        label = "".join(text for text, is_label in chat_segments(messages, processor.tokenizer, template)
                        if is_label)
        sequences.append(processor.tokenize(label).input_ids)
    n = 0
    while all(len(s) > n for s in sequences) and len({s[n] for s in sequences}) == 1:
        n += 1
    if not all(len(s) > n for s in sequences) or len({s[n] for s in sequences}) != len(letters):
        raise PillError("likelihood mode: this tokenizer does not give each option letter its own token after "
                        "'The answer is'; use mode 'generate'")
    return sequences[0][:n], [s[n] for s in sequences]


@torch.no_grad()
def option_logprobs(vlm, samples: Sequence, *, batch_size: int = 8, template: Optional[str] = None,
                    progress: bool = False, desc: str = "ranking") -> list[list[float]]:
    """``log P(letter_c | prompt, "The answer is")`` for every option c of every sample.

    Args:
        vlm: a :class:`~pill.vlm.PillVLM` with a tokenizer.
        samples: ScienceQA :class:`~pill.data.Sample` (``meta["choices"]``); the last
            (assistant) message, if any, is ignored.
        batch_size: prompts per forward pass; image and text-only prompts can share a batch.
    Returns one list per sample of ``len(choices)`` log-probabilities (floats), in sample order.
    One forward pass per batch: (B, T) left-padded prompts + prefix -> last-position logits (B, V).
    """
    from ..data.collate import Collator, prompt_items
    from ..processor import TEXT, Encoded

    processor = vlm.processor
    prefix, letter_ids = answer_prefix(processor, template)
    items = prompt_items(samples, processor, template=template)
    for item in items:
        enc = item["encoded"]
        item["encoded"] = Encoded(enc.input_ids + prefix, enc.modality_ids + [TEXT] * len(prefix),
                                  num_inputs=enc.num_inputs)
    collate = Collator(processor, padding_side="left")
    out: list[Optional[list[float]]] = [None] * len(samples)
    with _progress(len(samples), desc, progress) as bar:
        for batch_idx in _length_batches(items, batch_size):
            batch = collate([items[i] for i in batch_idx])
            logits = vlm(**_model_inputs(batch, vlm.device), logits="last").logits  # (B, V)
            logp = torch.log_softmax(logits.float(), dim=-1)[:, letter_ids]  # (B, 5)
            for row, i in enumerate(batch_idx):
                out[i] = logp[row, :len(samples[i].meta["choices"])].tolist()
            bar.update(len(batch_idx))
    return out  # type: ignore[return-value]


# -- generation -----------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(vlm, samples: Sequence, *, batch_size: int = 8, max_new_tokens: int = 8,
                     template: Optional[str] = None, progress: bool = False,
                     desc: str = "generating", temperature: float = 0.0, top_p: float = 1.0,
                     seed: Optional[int] = None, max_length: Optional[int] = None) -> list[str]:
    """Answers (text, special tokens removed, cut at end of turn) to the samples' prompts.

    Batches of ``batch_size`` prompts of similar length are left-padded and decoded together
    with the KV cache (:meth:`pill.vlm.PillVLM.generate`): greedy with ``temperature`` 0, else
    sampled with ``top_p`` from a generator seeded with ``seed``. ``max_length``: prompt and answer
    together at most this many tokens. Returns one string per sample, in order.
    """
    from ..data.collate import Collator, prompt_items

    processor = vlm.processor
    items = prompt_items(samples, processor, template=template)
    collate = Collator(processor, padding_side="left")
    eos = vlm.eos_token_ids()
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=vlm.device)
        generator.manual_seed(0 if seed is None else seed)
    out: list[Optional[str]] = [None] * len(samples)
    with _progress(len(samples), desc, progress) as bar:
        for batch_idx in _length_batches(items, batch_size):
            batch = collate([items[i] for i in batch_idx])
            room = [max_new_tokens if max_length is None else
                    min(max_new_tokens, max_length - len(items[i]["encoded"])) for i in batch_idx]
            tokens = vlm.generate(**_model_inputs(batch, vlm.device), max_new_tokens=max(1, max(room)),
                                  do_sample=temperature > 0, temperature=temperature, top_p=top_p,
                                  generator=generator)  # (B, N)
            for row, i in enumerate(batch_idx):
                ids = tokens[row].tolist()[:max(0, room[row])]
                cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                out[i] = processor.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
            bar.update(len(batch_idx))
    return out  # type: ignore[return-value]


# -- the evaluation -------------------------------------------------------------------------

def evaluate_scienceqa(vlm, data_root, split: str = "test", *, prompt_format: str = "QCM-A",
                       limit: Optional[int] = None, batch_size: int = 8, max_new_tokens: Optional[int] = None,
                       mode: str = "generate", out_dir=None, use_caption: bool = False,
                       template: Optional[str] = None, system_prompt: Optional[str] = None,
                       progress: bool = True, protocol: str = "pill", prompt_style: Optional[str] = None,
                       seed: int = 0) -> dict[str, Any]:
    """Answer the problems of one ScienceQA split, score them, and write the result files.

    Args:
        vlm: a :class:`~pill.vlm.PillVLM` with a tokenizer (e.g. from :func:`pill.build.load_run`).
        data_root: ScienceQA folder (official layout) or parquet export.
        split: ``test``, ``val``, ``minitest``, ...
        prompt_format: ``<input>-<output>`` as in training, e.g. ``QCM-A`` or ``QCM-ALE``.
        limit: only the first ``limit`` problems of the split.
        batch_size: prompts per batch (generation or forward pass).
        max_new_tokens: generation length; default 8 for output ``A``, 256 otherwise.
        mode: ``generate`` (greedy decoding + answer extraction) or ``likelihood``
            (rank the option letters, see the module docstring).
        out_dir: where ``predictions.json``, ``generations.jsonl`` and ``scores.json`` go
            (created); ``None`` writes nothing.
        use_caption: add ``captions.json`` captions to the context, as in training with captions.
        template: chat template name or string (default: the tokenizer's own, as in training).
        system_prompt: system message, as in training; default ``vlm.system_prompt``, which
            :func:`~pill.build.load_run` sets to the run's ``data.system_prompt`` (None there:
            the chat template's default, or the reference's message in the reference style).
        protocol: ``pill`` or ``reference`` (module docstring). ``reference`` fixes the prompt
            style, the sampling settings and the answer parsing, and needs mode ``generate``.
        prompt_style: ``pill`` or ``reference`` (:mod:`pill.data.prompts`); default the run's
            (``vlm.prompt_style``), ``reference`` under the reference protocol.
        seed: seeds the sampling and the random fallback of the reference protocol.

    Returns the scores (``NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg`` percentages, ``topics``,
    ``count``, ``unparsed``) plus ``split``, ``prompt_format``, ``mode``, ``seconds``,
    ``files`` (name -> path written; empty without ``out_dir``) and ``predictions``
    (qid -> option index, ``None`` where no answer could be read).
    """
    from ..data.scienceqa import load_scienceqa
    from .scienceqa_score import score

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    reference = protocol == "reference"
    if reference and mode != "generate":
        raise ConfigError("protocol reference: the reference generates its answers; use mode 'generate'")
    if reference and max_new_tokens is None:
        max_new_tokens = REFERENCE_SAMPLING["max_new_tokens"]
    max_new_tokens = _check_eval_args(vlm, prompt_format, mode, batch_size, limit, max_new_tokens)
    if system_prompt is None:
        system_prompt = getattr(vlm, "system_prompt", None)
    style = "reference" if reference else (prompt_style or getattr(vlm, "prompt_style", None) or "pill")
    start = time.perf_counter()
    samples = load_scienceqa(data_root, split, prompt_format=prompt_format, use_caption=use_caption,
                             limit=limit, progress=progress, system_prompt=system_prompt, prompt_style=style)
    if not samples:
        raise PillError(f"{data_root}: split {split!r} has no problems to evaluate")
    sampling = {k: REFERENCE_SAMPLING[k] for k in ("temperature", "top_p", "max_length")} if reference else {}
    texts, logprobs, preds = _answer(vlm, samples, mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     template=template, progress=progress, desc=f"ScienceQA {split} ({mode})",
                                     sampling={**sampling, "seed": seed} if reference else None)
    if reference:
        preds = [reference_answer(_prompt_text(s, vlm.processor, template) + t, len(s.meta["choices"]))
                 for s, t in zip(samples, texts)]
    predictions = {s.id: p for s, p in zip(samples, preds)}
    scores = score(predictions, {s.id: s.meta["problem"] for s in samples}, [s.id for s in samples],
                   official_fallback=reference, seed=seed)
    seconds = time.perf_counter() - start
    info = {"split": split, "prompt_format": prompt_format, "mode": mode, "protocol": protocol,
            "prompt_style": style, "limit": limit, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens if mode == "generate" else None, **sampling,
            "seed": seed if reference else None, "use_caption": use_caption, "seconds": round(seconds, 3),
            "run": getattr(vlm, "run_info", {}).get("run_dir")}
    files: dict[str, str] = {}
    if out_dir is not None:
        records = [_generation_record(s, text, lp, p, vlm.processor, template)
                   for s, text, lp, p in zip(samples, texts, logprobs, preds)]
        files = _write_results(Path(out_dir), predictions, records, {**scores, "eval": info})
    return {**scores, "split": split, "prompt_format": prompt_format, "mode": mode, "protocol": protocol,
            "prompt_style": style, "seconds": seconds, "files": files, "predictions": predictions}


def _check_eval_args(vlm, prompt_format: str, mode: str, batch_size: int, limit: Optional[int],
                     max_new_tokens: Optional[int]) -> int:
    """Raise ConfigError / PillError for a bad argument (before any data is read); returns max_new_tokens."""
    from ..data.prompts import parse_format

    if mode not in MODES:
        raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: must be >= 1, got {limit}")
    _, output_format = parse_format(prompt_format)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(prompt_format)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if vlm.processor is None:
        raise PillError("the model has no tokenizer; build PillVLM with one")
    if mode == "likelihood" and not output_format.startswith("A"):
        warnings.warn(f"likelihood mode with output format {output_format}: the model was trained to write the "
                      "explanation before 'The answer is X.', but the letter is scored right after the prompt",
                      stacklevel=3)
    return max_new_tokens


def _answer(vlm, samples: Sequence, mode: str, *, batch_size: int, max_new_tokens: int,
            template: Optional[str], progress: bool, desc: str,
            sampling: Optional[dict] = None) -> tuple[list, list, list]:
    """``(texts, option_logprobs, predictions)``, one per sample; None where a mode has no such value.
    ``sampling``: :func:`generate_answers` settings (temperature, top_p, seed, max_length)."""
    from .extract import extract_answer

    was_training = vlm.training
    vlm.eval()
    try:
        if mode == "generate":
            texts = generate_answers(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     template=template, progress=progress, desc=desc, **(sampling or {}))
            preds = [extract_answer(t, len(s.meta["choices"]), s.meta["choices"]) for t, s in zip(texts, samples)]
            return texts, [None] * len(samples), preds
        logprobs = option_logprobs(vlm, samples, batch_size=batch_size, template=template, progress=progress,
                                   desc=desc)
        return [None] * len(samples), logprobs, [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
    finally:
        vlm.train(was_training)


def _generation_record(sample, text: Optional[str], logprobs: Optional[list[float]], prediction: Optional[int],
                       processor, template: Optional[str]) -> dict[str, Any]:
    """One line of ``generations.jsonl``."""
    record = {"qid": sample.id, "prompt": _prompt_text(sample, processor, template)[-PROMPT_TAIL_CHARS:],
              "generation": text}
    if logprobs is not None:
        record["option_logprobs"] = [round(x, 5) for x in logprobs]
    record.update(prediction=prediction, answer=sample.meta["answer"], correct=prediction == sample.meta["answer"])
    return record


def _write_results(out: Path, predictions: dict[str, Optional[int]], records: list[dict],
                   scores: dict[str, Any]) -> dict[str, str]:
    """Write predictions.json, generations.jsonl and scores.json atomically; returns name -> path."""
    from ..io import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    files = {"predictions": str(out / "predictions.json"), "generations": str(out / "generations.jsonl"),
             "scores": str(out / "scores.json")}
    info = scores["eval"]
    write_atomic(files["predictions"], _json_text({
        "split": info["split"], "prompt_format": info["prompt_format"], "mode": info["mode"],
        "protocol": info["protocol"], "seed": info["seed"],
        "count": len(records), "results": {qid: (-1 if p is None else p) for qid, p in predictions.items()}}))
    write_atomic(files["generations"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(files["scores"], _json_text(scores))
    return files


# -- helpers --------------------------------------------------------------------------------

def _model_inputs(batch: dict, device) -> dict[str, torch.Tensor]:
    """The model's inputs of a collated batch: tokens, masks and every modality's preprocessed inputs."""
    from ..modalities import modalities

    keys = ("input_ids", "attention_mask", "modality_ids", *(m.inputs_key for m in modalities()))
    return {k: batch[k].to(device) for k in keys if k in batch}


def _length_batches(items: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar prompt length, longest first (least padding; memory errors show early)."""
    from ..data.collate import LengthGroupedBatchSampler

    lengths = [len(it["encoded"]) for it in items]
    return LengthGroupedBatchSampler(lengths, batch_size, shuffle=False).batches()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="problem", disable=None if enabled else True, leave=False)


def _prompt_text(sample, processor, template: Optional[str]) -> str:
    from ..data.prompts import render_chat

    messages = sample.messages[:-1] if sample.messages and sample.messages[-1]["role"] == "assistant" \
        else sample.messages
    own = template if template is not None else sample.meta.get("template")
    return render_chat(processor.tokenizer, messages, own, add_generation_prompt=True)


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


__all__ = ["MODES", "PROTOCOLS", "evaluate_scienceqa", "generate_answers", "option_logprobs", "answer_prefix",
           "default_max_new_tokens", "reference_answer", "REFERENCE_SAMPLING"]
