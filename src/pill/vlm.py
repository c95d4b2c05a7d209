"""The vision-language model: frozen VPG -> trainable projector -> plugged, frozen LLM."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plug import PREFIX, PillValueProj, is_plugged, parameter_groups, plug, set_stage as _set_llm_stage
from .config import PillConfig
from .errors import DataError
from .processor import IMAGE, PillProcessor
from .vpg import VisualPromptGenerator


@dataclass
class VLMOutput:
    loss: Optional[torch.Tensor] = None  # mean over answer tokens
    loss_sum: Optional[torch.Tensor] = None  # sum over answer tokens (for exact gradient accumulation)
    num_tokens: int = 0  # answer tokens in the batch
    logits: Optional[torch.Tensor] = None  # (B, T, V), (B, V) for "last", or None
    cache: object = None


class FeatureNorm(nn.Module):
    """Per-channel standardisation of the frozen VPG's features: ``(x - mean) / std``.

    The statistics come from training images (:meth:`fit`, called at the start of training,
    see :meth:`PillVLM.fit_feature_norm`) and travel with the trained tensors; until then it
    is the identity. Features from a block inside a CNN are not centred (some channels sit at
    +10 on every image), which a bias-free projector learns slowly; standardised, every
    channel starts on an equal footing.
    """

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, device=device))
        self.register_buffer("std", torch.ones(dim, device=device))
        self.register_buffer("count", torch.zeros(1, dtype=torch.int64, device=device))  # vectors seen; 0: not fitted

    @property
    def fitted(self) -> bool:
        return int(self.count) > 0

    @torch.no_grad()
    def fit(self, batches) -> int:
        """Set the statistics from ``batches`` of features (..., dim); returns the number of vectors."""
        dim = self.mean.numel()
        total, s1, s2 = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
        for f in batches:
            if f.shape[-1] != dim:
                raise DataError(f"feature_norm: features of width {f.shape[-1]}, expected {dim}")
            f = f.reshape(-1, dim).to(device="cpu", dtype=torch.float64)
            total += f.shape[0]
            s1 += f.sum(0)
            s2 += f.square().sum(0)
        if total < 2:
            raise DataError("feature_norm: needs the features of at least one image to fit its statistics")
        mean = s1 / total
        std = (s2 / total - mean.square()).clamp_min(0).mul(total / (total - 1)).sqrt()
        std = std.clamp_min(max(1e-6, 1e-2 * float(std.mean())))  # near-constant channels are not blown up
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        self.count.fill_(total)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _cache_kw(decoder: nn.Module) -> str:
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PillVLM(nn.Module):
    """A frozen visual prompt generator, a trainable projector and a plugged LLM.

    Args:
        llm: a Hugging Face causal LM (LLaMA, Mistral or Qwen2 family); it is frozen and plugged.
        vpg: a frozen :class:`~pill.vpg.VisualPromptGenerator`.
        tokenizer: the LLM's tokenizer (optional; needed for :meth:`chat` and the processor).
        config: the plug-in configuration.
        feature_norm: standardise the VPG features per channel before the projector
            (:class:`FeatureNorm`, ``pill_feature_norm``); not part of the paper's method, off by default.

    ``pill_projector``: ``Linear(d_vpg -> d_llm, bias=False)``, init N(0, 0.02).
    """

    def __init__(self, llm: nn.Module, vpg: VisualPromptGenerator, tokenizer=None, config: Optional[PillConfig] = None,
                 feature_norm: bool = False):
        super().__init__()
        config = config or PillConfig()
        self.pill_config = config
        self.vpg = vpg.freeze()
        self.llm = llm if is_plugged(llm) else plug(llm, config)
        device = next(llm.parameters()).device
        self.pill_projector = nn.Linear(vpg.dim, llm.config.hidden_size, bias=False, device=device)
        nn.init.normal_(self.pill_projector.weight, std=0.02)
        self.pill_feature_norm = FeatureNorm(vpg.dim, device=device) if feature_norm else None
        self.tokenizer = tokenizer
        self.processor = PillProcessor(tokenizer, vpg.num_tokens, vpg.preprocess) if tokenizer is not None else None
        # system message of chat(); None: the chat template's default (load_run sets the run's)
        self.system_prompt: Optional[str] = None
        self._cache_kw = _cache_kw(self.decoder)
        self.set_stage("finetune")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, llm: str = "smollm2-135m-instruct", vpg: str = "efficientnet-lite0",
                        vpg_path: Optional[str] = None, config: Optional[PillConfig] = None,
                        pool: Optional[int] = None, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", vpg_layer: Optional[int] = None,
                        feature_norm: bool = False) -> "PillVLM":
        """Load an LLM (embedded default, folder or hub id) and a VPG by name, and plug them together.

        ``vpg_layer``: which VPG layer gives the tokens (:func:`~pill.vpg.load_vpg`)."""
        from .models import load_llm, load_tokenizer
        from .vpg import load_vpg

        model = load_llm(llm, dtype=dtype, device=device)
        tok = load_tokenizer(llm)
        v = load_vpg(vpg, vpg_path, pool=pool, layer=vpg_layer).to(device)
        return cls(model, v, tok, config, feature_norm=feature_norm)

    @property
    def decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    @property
    def device(self) -> torch.device:
        return self.pill_projector.weight.device

    # -- stages and parameters -------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """``align`` or ``finetune`` (design note, section 4); the projector trains in both."""
        _set_llm_stage(self.llm, stage)
        self.pill_projector.weight.requires_grad_(True)

    def enable_plugin_recompute(self, enabled: bool = True) -> None:
        """Recompute each layer's norm + plug-in in the backward pass instead of keeping their
        activations: the plug-ins' share of activation memory goes (about 0.1x of the frozen
        model's) for a few per cent more step time. Superseded by :meth:`enable_gradient_checkpointing`,
        which recomputes whole layers."""
        self.llm.pill_handle.state.recompute = enabled

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the frozen LLM's layer activations in the backward pass (less memory, ~1/3 more time).

        The per-token modality ids stay set between the forward and the backward pass, so the
        recomputed layers route tokens exactly as the first pass did."""
        self.enable_plugin_recompute(False)  # the layers are recomputed whole
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def stage(self) -> Optional[str]:
        return self.llm.pill_handle.state.stage

    def _pill_buffers(self) -> dict[str, torch.Tensor]:
        """Fitted, not trained, state (names contain ``pill_``: the feature statistics)."""
        return {n: b for n, b in self.named_buffers() if PREFIX in n}

    def pill_state_dict(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Plug-in and projector tensors (names contain ``pill_``); only the trainable ones by default.
        ``pill_`` buffers (the feature statistics of ``pill_feature_norm``) are always included."""
        state = {n: p.detach().clone() for n, p in self.named_parameters()
                 if PREFIX in n and (p.requires_grad or not trainable_only)}
        state.update({n: b.detach().clone() for n, b in self._pill_buffers().items()})
        return state

    def fit_feature_norm(self, batches) -> int:
        """Fit ``pill_feature_norm`` on ``batches`` of VPG features (N, K, d); returns the vector count."""
        if self.pill_feature_norm is None:
            raise ValueError("this model was built without feature_norm")
        return self.pill_feature_norm.fit(batches)

    def load_pill_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Copy plug-in tensors in; returns the names loaded. ``strict``: unknown names are an error."""
        if strict and self.pill_feature_norm is None and any(n.startswith("pill_feature_norm.") for n in state):
            raise KeyError("the checkpoint has feature statistics (pill_feature_norm) but this model was built "
                           "without feature_norm (model.feature_norm: true in the run's config)")
        params = {**dict(self.named_parameters()), **self._pill_buffers()}
        unknown = [n for n in state if n not in params or PREFIX not in n]
        if unknown and strict:
            raise KeyError(f"{len(unknown)} tensors do not match this model's plug-ins, e.g. {unknown[:3]}")
        loaded = []
        with torch.no_grad():
            for n, t in state.items():
                if n in params and PREFIX in n:
                    if params[n].shape != t.shape:
                        raise ValueError(f"{n}: checkpoint shape {tuple(t.shape)} != model shape {tuple(params[n].shape)}")
                    params[n].copy_(t)
                    loaded.append(n)
        return loaded

    def parameter_table(self) -> list[dict]:
        """Rows ``{part, parameters, trainable}`` per plug-in group, the frozen parts, and the total."""
        groups: dict[str, list[int]] = {}
        names = {"attn_adapter": "attention-input adapters", "gate": "attention gates (MAG)",
                 "projector": "projector"}
        group_of = {id(p): g for g, ps in parameter_groups(self).items() for _, p in ps}
        for n, p in self.named_parameters():
            if PREFIX in n:
                g = group_of.get(id(p), "projector" if n.startswith("pill_projector.") else "other")
                if g.startswith("expert:"):
                    m = g.split(":")[1]
                    label = "FFN adapter (shared, no MoMAE)" if not self.pill_config.momae else \
                        {"0": "L-experts (text)", "1": "V-experts (image)"}.get(m, f"experts (modality {m})")
                else:
                    label = names.get(g, g)
            elif n.startswith("vpg."):
                label = "VPG (frozen)"
            else:
                label = "LLM (frozen)"
            row = groups.setdefault(label, [0, 0])
            row[0] += p.numel()
            row[1] += p.numel() if p.requires_grad else 0
        rows = [{"part": k, "parameters": v[0], "trainable": v[1]} for k, v in groups.items()]
        rows.append({"part": "total", "parameters": sum(r["parameters"] for r in rows),
                     "trainable": sum(r["trainable"] for r in rows)})
        return rows

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> frozen VPG features (N, K, d_vpg)."""
        return self.vpg(pixel_values.to(self.device))

    def embed(self, input_ids: torch.Tensor, modality_ids: Optional[torch.Tensor] = None,
              pixel_values: Optional[torch.Tensor] = None,
              image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with the visual-token slots (modality 1) filled by projected VPG features.

        input_ids, modality_ids: (B, T); pixel_values: (N, 3, H, W) or image_features: (N, K, d_vpg),
        images in order of their slots. Returns (B, T, d_llm).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, d)
        if pixel_values is None and image_features is None:
            if modality_ids is not None and bool((modality_ids == IMAGE).any()):
                raise DataError("the batch has image slots (modality 1) but neither pixel_values nor image_features")
            return embeds
        feats = image_features if image_features is not None else self.encode_images(pixel_values)
        feats = feats.to(self.device)
        if feats.shape[-1] != self.pill_projector.in_features or feats.shape[1] != self.vpg.num_tokens:
            raise DataError(f"image features have shape {tuple(feats.shape)}; this model's VPG gives "
                            f"(N, {self.vpg.num_tokens}, {self.pill_projector.in_features})")
        slots = modality_ids == IMAGE  # (B, T)
        n_slots = int(slots.sum())
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise DataError(f"the batch has {n_slots} image-token slots but {feats.shape[0]} image(s) x "
                            f"{feats.shape[1]} tokens = {feats.shape[0] * feats.shape[1]}")
        proj_dtype = self.pill_projector.weight.dtype
        feats = feats.to(proj_dtype)
        if self.pill_feature_norm is not None:
            feats = self.pill_feature_norm(feats)
        visual = self.pill_projector(feats).to(embeds.dtype)  # (N, K, d)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                modality_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache=None, use_cache: bool = False, logits: str = "auto", **_ignored) -> VLMOutput:
        """Run the plugged LLM on an interleaved batch.

        Args:
            input_ids, attention_mask, modality_ids, labels: (B, T); labels use -100 where no loss.
            pixel_values (N, 3, H, W) or image_features (N, K, d_vpg): the batch's images in slot order.
            logits: ``all`` (B, T, V), ``last`` (B, V), ``none``, or ``auto`` (``none`` when labels are
                given: the LM head then runs only on answer positions, which saves most of its cost).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, modality_ids, pixel_values, image_features)
        B, T = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mods = modality_ids if modality_ids is not None and bool((modality_ids != 0).any()) else None
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           modality_ids=mods, use_cache=use_cache, **{self._cache_kw: cache})
        hidden = out.last_hidden_state  # (B, T, d)
        head = self.llm.get_output_embeddings()
        result = VLMOutput(cache=out.cache if self._cache_kw == "cache" else out.past_key_values)
        if labels is not None:
            target = labels[:, 1:]
            mask = target != -100  # (B, T-1)
            h = hidden[:, :-1][mask]  # (N_answer, d)
            loss_sum = F.cross_entropy(head(h).float(), target[mask], reduction="sum")
            n = int(mask.sum())
            result.loss_sum = loss_sum
            result.num_tokens = n
            result.loss = loss_sum / max(n, 1)
        if logits == "auto":
            logits = "none" if labels is not None else "all"
        if logits == "all":
            result.logits = head(hidden)
        elif logits == "last":
            result.logits = head(hidden[:, -1])
        return result

    # -- generation -------------------------------------------------------------------------
    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is not None:
            return set(eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])
        ids: set[int] = set()
        gen = getattr(self.llm, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(src)
        return ids

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 modality_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                 image_features: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, use_cache: bool = True, streamer: Optional[Callable[[torch.Tensor], None]] = None,
                 generator: Optional[torch.Generator] = None, **_ignored) -> torch.Tensor:
        """Greedy (default) or sampled decoding with the KV cache; prompts must be left-padded.

        Tokens produced here are text (modality 0). ``streamer(tokens (B,))`` is called after each
        step. Returns the new tokens (B, <= max_new_tokens); finished rows are padded with the pad id.
        With ``use_cache=False`` the whole sequence is recomputed at every step (same greedy output).
        """
        input_ids = input_ids.to(self.device)
        B = input_ids.shape[0]
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        modality_ids = None if modality_ids is None else modality_ids.to(self.device)
        embeds = self.embed(input_ids, modality_ids, pixel_values, image_features)
        eos = self._eos_ids(eos_token_id)
        eos_ids = torch.tensor(sorted(eos), device=self.device) if eos else None  # built once, not per step
        pad = self.processor.pad_token_id if self.processor is not None else (min(eos) if eos else 0)
        mods = modality_ids if modality_ids is not None else torch.zeros_like(input_ids)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        new_tokens = []
        out = self(inputs_embeds=embeds, attention_mask=attention_mask, modality_ids=mods, use_cache=use_cache,
                   logits="last")
        cache = out.cache
        next_logits = out.logits  # (B, V)
        for _ in range(max_new_tokens):
            token = self._pick(next_logits, do_sample, temperature, top_p, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, pad), token)
            new_tokens.append(token)
            if streamer is not None:
                streamer(token)
            if eos_ids is not None:
                done = done | torch.isin(token, eos_ids)
            if bool(done.all()) or len(new_tokens) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype,
                                                                   device=self.device)], dim=1)
            tok_embed = self.llm.get_input_embeddings()(token[:, None])  # (B, 1, d)
            if use_cache:
                pos = (attention_mask.sum(-1, keepdim=True) - 1)  # (B, 1)
                out = self(inputs_embeds=tok_embed, attention_mask=attention_mask, position_ids=pos,
                           cache=cache, use_cache=True, logits="last")
                cache = out.cache
            else:
                embeds = torch.cat([embeds, tok_embed], dim=1)
                mods = torch.cat([mods, torch.zeros(B, 1, dtype=mods.dtype, device=self.device)], dim=1)
                out = self(inputs_embeds=embeds, attention_mask=attention_mask, modality_ids=mods, logits="last")
            next_logits = out.logits
        return torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(B, 0)

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: Optional[torch.Generator]) -> torch.Tensor:
        if not do_sample or temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # -- convenience ------------------------------------------------------------------------
    def chat(self, prompt: str, images: Sequence = (), history: Optional[list[dict]] = None,
             max_new_tokens: int = 128, stream: Optional[Callable[[str], None]] = None, **gen) -> str:
        """Answer ``prompt`` about ``images`` (PIL images or paths). ``<image>`` placeholders are
        prepended for images the prompt does not mention. ``stream(text_piece)`` receives the answer
        as it is produced. ``history``: earlier {role, content} turns (their images not repeated).
        ``self.system_prompt`` (set by :func:`pill.inference.load_run` from the run's
        ``data.system_prompt``) opens the conversation unless ``history`` has a system turn."""
        from .data.images import load_image

        if self.processor is None:
            raise ValueError("this model has no tokenizer; pass one to PillVLM(...)")
        imgs = [load_image(i) if not hasattr(i, "size") else i for i in images]
        missing = len(imgs) - prompt.count("<image>")
        if missing > 0:
            prompt = "<image>\n" * missing + prompt
        messages = list(history or []) + [{"role": "user", "content": prompt}]
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.processor.chat_prompt(messages, add_generation_prompt=True)
        n_hist_images = sum(m["content"].count("<image>") for m in history or [])
        if n_hist_images:
            raise ValueError("images in earlier turns are not supported by chat(); put them in the first prompt")
        batch = self.processor([text], [imgs])
        pieces: list[int] = []
        printed = ""

        def on_token(tok: torch.Tensor) -> None:
            nonlocal printed
            pieces.append(int(tok[0]))
            text_now = self.tokenizer.decode(pieces, skip_special_tokens=True)
            if stream is not None and len(text_now) > len(printed) and not text_now.endswith("\ufffd"):
                stream(text_now[len(printed):])
                printed = text_now

        self.generate(**batch, max_new_tokens=max_new_tokens, streamer=on_token, **gen)
        final = self.tokenizer.decode(pieces, skip_special_tokens=True)
        if stream is not None and len(final) > len(printed):
            stream(final[len(printed):])
        return final.strip()

    @torch.no_grad()
    def measure_gates(self, **batch) -> dict:
        """Mean |tanh(g)| per plugged layer over the visual tokens of ``batch`` (the paper's Figure 4)."""
        gates = [(i, m) for i, m in self._gate_modules()]
        for _, g in gates:
            g.record, g.last_abs_gate = True, None
        try:
            self(**{k: v for k, v in batch.items() if k != "labels"}, logits="none")
        finally:
            for _, g in gates:
                g.record = False
        return {"layers": [i for i, _ in gates], "variant": self.pill_config.gate,
                "mean_abs_gate": [float(g.last_abs_gate.mean()) if g.last_abs_gate is not None else 0.0
                                  for _, g in gates],
                "per_head": [g.last_abs_gate.tolist() if g.last_abs_gate is not None else [] for _, g in gates]}

    def _gate_modules(self):
        for name, m in self.llm.named_modules():
            if isinstance(m, PillValueProj):
                yield int(name.split(".layers.")[1].split(".")[0]), m.pill_gate
