"""Item 4: one stage-1 (align) epoch on the synthetic benchmark, with and without cached VPG features.

Images and captions come from ``pill.data.synth`` (PNG files on disk, CC595K-style caption
requests). Samples are tokenised once, before timing, as the training data pipeline does.

- ``vpg``: every step loads the PNGs, preprocesses them and runs the frozen VPG, then the
  plugged LLM forward + backward and the AdamW step;
- ``cache``: the features were computed once (``pill.train.features.FeatureCache``; the
  one-off build time is reported separately) and every step reads them from the safetensors
  shard instead.

Only the image side differs, so the speed-up is bounded by (epoch) / (epoch - image side):
the breakdown of the ``vpg`` epoch is reported to show that bound.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .common import autocast, interleave, load_base_llm, ratio, summary, sync


def _write_images(folder: Path, n: int) -> list[tuple[str, str, str]]:
    """(image path, caption request, caption) for ``n`` synthetic training images."""
    import json

    from pill.data.synth import make_synth

    make_synth(folder, n_train=n, n_test=0, n_val=0, seed=0, progress=False)
    rows = json.loads((folder / "captions_llava.json").read_text())
    out = []
    for r in rows:
        human = r["conversations"][0]["value"]
        out.append((str(folder / "images" / r["image"]), human, r["conversations"][1]["value"]))
    return out


class _Cache:
    """The features of ``paths`` in a :class:`pill.train.features.FeatureCache`, built once (timed)."""

    impl = "pill.train.features.FeatureCache"

    def __init__(self, root: Path, vpg, paths: list[str], batch_size: int):
        from pill.data import content_key
        from pill.train.features import FeatureCache

        t = time.perf_counter()
        self.cache = FeatureCache(root, vpg)
        self.keys = {p: content_key(p) for p in paths}
        self.cache.build({self.keys[p]: p for p in paths}, batch_size=batch_size, progress=False)
        self.build_s = time.perf_counter() - t

    def get(self, paths: list[str]) -> torch.Tensor:
        return self.cache.get([self.keys[p] for p in paths])


def bench_feature_cache(model: str, device: torch.device, n_images: int, batch_size: int, warmup: int, reps: int,
                        log: Optional[Callable[[str], None]] = print) -> dict:
    from pill.config import PillConfig
    from pill.data.images import load_image
    from pill.models import load_tokenizer
    from pill.processor import Encoded
    from pill.vlm import PillVLM
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    vpg = EfficientNetVPG(pretrained=model == "embedded", pool=None if model == "embedded" else 4).to(device)
    vlm = PillVLM(load_base_llm(model, device), vpg, load_tokenizer(), PillConfig())
    vlm.set_stage("align")
    vlm.train()
    proc = vlm.processor
    eos = proc.tokenizer.eos_token_id
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-5)
    with tempfile.TemporaryDirectory(prefix="pill-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        rows = _write_images(tmp / "synth", n_images)
        render_s = time.perf_counter() - t
        samples = []
        for path, human, caption in rows:  # tokenised once, as the dataset does
            prompt = proc.tokenize(human + "\n")
            answer = proc.tokenizer(" " + caption, add_special_tokens=False)["input_ids"] + [eos]
            enc = Encoded(input_ids=[1] + prompt.input_ids + answer,
                          modality_ids=[0] + prompt.modality_ids + [0] * len(answer),
                          labels=[-100] * (1 + len(prompt.input_ids)) + answer, num_images=prompt.num_images)
            samples.append((path, enc))
        batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
        padded = [(([p for p, _ in b]), {k: v.to(device) for k, v in proc.pad([e for _, e in b]).items()})
                  for b in batches]
        cache = _Cache(tmp / "features", vpg, [p for p, _ in samples], batch_size)
        parts = {"load_preprocess_s": 0.0, "vpg_s": 0.0, "llm_step_s": 0.0, "cache_read_s": 0.0}
        record = [False]

        def llm_step(batch, feats):
            with autocast(device):
                out = vlm(**batch, image_features=feats)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def lap(key, t0):
            sync(device)
            now = time.perf_counter()
            if record[0]:
                parts[key] += now - t0
            return now

        def epoch_vpg():
            for paths, batch in padded:
                t0 = time.perf_counter()
                pix = vpg.preprocess([load_image(p) for p in paths]).to(device)
                t0 = lap("load_preprocess_s", t0)
                with autocast(device):
                    feats = vlm.encode_images(pix)
                t0 = lap("vpg_s", t0)
                llm_step(batch, feats)
                lap("llm_step_s", t0)

        def epoch_cache():
            for paths, batch in padded:
                t0 = time.perf_counter()
                feats = cache.get(paths).to(device)
                t0 = lap("cache_read_s", t0)
                llm_step(batch, feats)

        if log:
            log(f"  feature cache: {n_images} images, batch {batch_size}, {len(padded)} steps per epoch "
                f"(cache built in {cache.build_s:.1f} s by {cache.impl})")
        for _ in range(warmup):
            epoch_vpg()
            epoch_cache()
        record[0] = True
        times = interleave({"vpg": epoch_vpg, "cache": epoch_cache}, 0, reps, device, log=log)
    n_reps = max(reps, 1)
    parts = {k: v / n_reps for k, v in parts.items()}
    image_side = parts["load_preprocess_s"] + parts["vpg_s"]
    epoch = parts["load_preprocess_s"] + parts["vpg_s"] + parts["llm_step_s"]
    seq = [int(b["attention_mask"].sum(-1).float().mean()) for _, b in padded]
    return {"images": n_images, "batch": batch_size, "steps_per_epoch": len(padded), "visual_tokens": vpg.num_tokens,
            "mean_sequence_tokens": sum(seq) / len(seq), "vpg": vpg.name, "cache_impl": cache.impl,
            "cache_build_s": cache.build_s, "render_s": render_s, "warmup": warmup, "reps": reps,
            "epoch_vpg": summary(times["vpg"]), "epoch_cache": summary(times["cache"]),
            "speedup": ratio(times["vpg"], times["cache"]),
            "breakdown_vpg_epoch_s": parts,
            "amdahl_bound": epoch / max(epoch - image_side, 1e-9)}
