"""The vision-language model: frozen VPG -> trainable projector -> plugged, frozen LLM."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plug import PREFIX, PillValueProj, is_plugged, parameter_groups, plug, set_stage as _set_llm_stage
from .config import PillConfig
from .encoders import VisualPromptGenerator
from .errors import CheckpointError, ConfigError, DataError
from .modalities import IMAGE, Modality, modality, modality_by_id
from .processor import IGNORE_INDEX, InputSlots, PillProcessor

# Tensor names of checkpoints written before the projector and the feature statistics were kept per
# modality (image only): old prefix -> new prefix.
LEGACY_NAMES = (("pill_projector.weight", "pill_projector.image.weight"),
                ("pill_feature_norm.", "pill_feature_norm.image."))


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
    """Frozen encoders (one per modality), trainable projectors and a plugged LLM.

    Args:
        llm: a Hugging Face causal LM; it is frozen and plugged.
        vpg: the frozen image encoder (a :class:`~pill.encoders.VisualPromptGenerator`); shorthand for
            ``encoders={"image": vpg}``.
        tokenizer: the LLM's tokenizer (optional; needed for :meth:`chat` and the processor).
        config: the plug-in configuration; ``num_modalities`` grows to cover every encoder's modality.
        feature_norm: standardise the image encoder's features per channel before its projector
            (:class:`FeatureNorm`); not part of the paper's method, off by default.
        encoders: modality name (:mod:`pill.modalities`) -> frozen encoder, for further modalities.
        feature_norms: modality names whose features are standardised (``feature_norm`` adds image).

    ``pill_projector[name]``: ``Linear(d_encoder -> d_llm, bias=False)``, init N(0, 0.02), one per
    modality; ``pill_feature_norm[name]`` for the standardised ones.
    """

    def __init__(self, llm: nn.Module, vpg: Optional[VisualPromptGenerator] = None, tokenizer=None,
                 config: Optional[PillConfig] = None, feature_norm: bool = False, *,
                 encoders: Optional[dict[str, nn.Module]] = None, feature_norms: Sequence[str] = ()):
        super().__init__()
        encoders = {**({"image": vpg} if vpg is not None else {}), **(encoders or {})}
        if not encoders:
            raise ConfigError("a PillVLM needs at least one encoder (vpg= or encoders=)")
        mods = {name: modality(name) for name in encoders}
        config = config or PillConfig()
        needed = 1 + max(m.id for m in mods.values())
        if config.num_modalities < needed:  # one expert per modality id, text included
            config = replace(config, num_modalities=needed)
        self.pill_config = config
        self.modalities: dict[str, Modality] = dict(sorted(mods.items(), key=lambda kv: kv[1].id))
        self.encoders = nn.ModuleDict({name: encoders[name].freeze() for name in self.modalities})
        self.llm = llm if is_plugged(llm) else plug(llm, config)
        device = next(llm.parameters()).device
        d = llm.config.hidden_size
        self.pill_projector = nn.ModuleDict()
        for name, enc in self.encoders.items():
            self.pill_projector[name] = nn.Linear(enc.dim, d, bias=False, device=device)
            nn.init.normal_(self.pill_projector[name].weight, std=0.02)
        norms = set(feature_norms) | ({"image"} if feature_norm else set())
        unknown = norms - set(self.encoders)
        if unknown:
            raise ConfigError(f"feature_norm: no encoder for modality {', '.join(sorted(unknown))}")
        self.pill_feature_norm = nn.ModuleDict({n: FeatureNorm(self.encoders[n].dim, device=device)
                                                for n in self.encoders if n in norms})
        self.tokenizer = tokenizer
        self.processor = None
        if tokenizer is not None:
            slots = {n: InputSlots(self.modalities[n], e.num_tokens, e.preprocess) for n, e in self.encoders.items()}
            self.processor = PillProcessor(tokenizer, slots=slots)
        # system message of chat(); None: the chat template's default (load_run sets the run's)
        self.system_prompt: Optional[str] = None
        self._cache_kw = _cache_kw(self.decoder)
        # the batch keys this model reads: each modality's inputs and cached features
        self._input_keys = {k for m in self.modalities.values() for k in (m.inputs_key, m.features_key)}
        self.set_stage("finetune")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, llm: str = "smollm2-135m-instruct", vpg: str = "efficientnet-lite0",
                        vpg_path: Optional[str] = None, config: Optional[PillConfig] = None,
                        pool: Optional[int] = None, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", vpg_layer: Optional[int] = None,
                        feature_norm: bool = False) -> "PillVLM":
        """Load an LLM (embedded default, folder or hub id) and a VPG by name, and plug them together.

        ``vpg_layer``: which VPG layer gives the tokens (:func:`~pill.encoders.load_encoder`)."""
        from .models import load_llm, load_tokenizer
        from .encoders import load_encoder

        model = load_llm(llm, dtype=dtype, device=device)
        tok = load_tokenizer(llm)
        v = load_encoder(vpg, vpg_path, pool=pool, layer=vpg_layer).to(device)
        return cls(model, v, tok, config, feature_norm=feature_norm)

    @property
    def vpg(self) -> nn.Module:
        """The image encoder (ConfigError for a model without one, ``model.vpg: null``)."""
        if "image" not in self.encoders:
            raise ConfigError(f"this model has no image encoder (its encoders: {', '.join(self.encoders)})")
        return self.encoders["image"]

    def encoder_fingerprints(self) -> dict[str, str]:
        """Checkpoint metadata keys -> fingerprints of the frozen encoders (``vpg_fingerprint``: image)."""
        return {("vpg_fingerprint" if n == "image" else f"encoder_fingerprint.{n}"): e.fingerprint()
                for n, e in self.encoders.items()}

    @property
    def decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    @property
    def device(self) -> torch.device:
        return next(iter(self.pill_projector.values())).weight.device

    # -- stages and parameters -------------------------------------------------------------
    def set_stage(self, stage: str, align_modality: Optional[str] = None) -> None:
        """``align`` or ``finetune`` (design note, section 4); the projectors train in both.
        ``align_modality``: the modality whose expert takes the text tokens in the last layer while
        aligning (:func:`pill.plug.set_stage`); default: image, or the model's first modality by id
        when it has no image encoder."""
        if align_modality is None:
            align_modality = "image" if "image" in self.modalities else \
                min(self.modalities, key=lambda n: self.modalities[n].id)
        if align_modality not in self.modalities:
            raise ConfigError(f"align_modality: this model has no {align_modality} encoder "
                              f"(its modalities: {', '.join(self.modalities)})")
        _set_llm_stage(self.llm, stage, align_modality=self.modalities[align_modality].id)
        for proj in self.pill_projector.values():
            proj.weight.requires_grad_(True)

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

    def compile_layers(self, **options) -> None:
        """``torch.compile`` every decoder layer of the LLM in place (``train.compile``).

        Regional compilation: the layers share their code, so one compiled graph serves all of
        them and compiling takes the time of one layer, not of the whole model. The embedding,
        the routing (:func:`pill.modules.route`, the forward's host sync) and the loss stay
        eager, outside the compiled graphs, so the layers compile without a graph break; the
        number of routed rows changes from batch to batch and is traced as a dynamic size after
        the first recompilation. Compiling in place keeps every parameter name (checkpoints are
        unaffected). ``options`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``)."""
        for layer in self.decoder.layers:
            layer.compile(**options)

    @property
    def stage(self) -> Optional[str]:
        return self.llm.pill_handle.state.stage

    def _pill_buffers(self) -> dict[str, torch.Tensor]:
        """Fitted, not trained, state (names contain ``pill_``: the feature statistics)."""
        return {n: b for n, b in self.named_buffers() if PREFIX in n}

    def pill_state_names(self, trainable_only: bool = True) -> list[str]:
        """The names :meth:`pill_state_dict` returns, in its order, without copying tensors."""
        names = [n for n, p in self.named_parameters() if PREFIX in n and (p.requires_grad or not trainable_only)]
        return names + list(self._pill_buffers())

    def pill_state_dict(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Plug-in and projector tensors (names contain ``pill_``); only the trainable ones by default.
        ``pill_`` buffers (the feature statistics of ``pill_feature_norm``) are always included."""
        state = {n: p.detach().clone() for n, p in self.named_parameters()
                 if PREFIX in n and (p.requires_grad or not trainable_only)}
        state.update({n: b.detach().clone() for n, b in self._pill_buffers().items()})
        return state

    def feature_norms_to_fit(self) -> list[str]:
        """Modalities whose feature statistics are still to be fitted."""
        return [n for n, norm in self.pill_feature_norm.items() if not norm.fitted]

    def fit_feature_norm(self, batches, modality: str = "image") -> int:
        """Fit ``pill_feature_norm[modality]`` on ``batches`` of encoder features (N, K, d); returns
        the vector count."""
        if modality not in self.pill_feature_norm:
            raise ConfigError(f"this model standardises no {modality} features (feature_norm is off for it)")
        return self.pill_feature_norm[modality].fit(batches)

    @staticmethod
    def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in state.items():
            for old, new in LEGACY_NAMES:
                # only the old flat names (pill_feature_norm.mean): a modality's own
                # (pill_feature_norm.audio.mean) has a further dot
                if n.startswith(old) and not n.startswith(new) and "." not in n[len(old):]:
                    n = new + n[len(old):]
                    break
            out[n] = t
        return out

    def load_pill_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Copy plug-in tensors in; returns the names loaded. ``strict``: unknown names are an error
        (:class:`~pill.errors.CheckpointError`). Names written before the projector was kept per
        modality (``pill_projector.weight``) load as the image's."""
        state = self._rename_legacy(state)
        params = {**dict(self.named_parameters()), **self._pill_buffers()}
        if strict:
            norms = sorted({n.split(".")[1] for n in state if n.startswith("pill_feature_norm.")}
                           - set(self.pill_feature_norm))
            if norms:
                raise CheckpointError(f"the checkpoint has feature statistics of {', '.join(norms)} "
                                      "(pill_feature_norm) but this model was built without feature_norm for it "
                                      "(model.feature_norm: true in the run's config)")
            unknown = [n for n in state if n not in params or PREFIX not in n]
            if unknown:
                raise CheckpointError(f"{len(unknown)} tensors do not match this model's plug-ins, "
                                      f"e.g. {unknown[:3]}")
        loaded = []
        with torch.no_grad():
            for n, t in state.items():
                if n in params and PREFIX in n:
                    if params[n].shape != t.shape:
                        raise CheckpointError(f"{n}: checkpoint shape {tuple(t.shape)} != model shape "
                                              f"{tuple(params[n].shape)}")
                    params[n].copy_(t)
                    loaded.append(n)
        return loaded

    def parameter_table(self) -> list[dict]:
        """Rows ``{part, parameters, trainable}`` per plug-in group, the frozen parts, and the total."""
        groups: dict[str, list[int]] = {}
        names = {"attn_adapter": "attention-input adapters", "gate": "attention gates (MAG)"}
        group_of = {id(p): g for g, ps in parameter_groups(self).items() for _, p in ps}
        for n, p in self.named_parameters():
            if n.startswith("pill_projector."):
                label = "projector" if len(self.pill_projector) == 1 else f"projector ({n.split('.')[1]})"
            elif PREFIX in n:
                g = group_of.get(id(p), "other")
                if g.startswith("expert:"):
                    m = g.split(":")[1]
                    owner = modality_by_id(int(m)) if m.isdigit() else None
                    label = "FFN adapter (shared, no MoMAE)" if not self.pill_config.momae else \
                        "L-experts (text)" if m == "0" else "V-experts (image)" if m == str(IMAGE) else \
                        f"{owner.name} experts" if owner is not None else f"experts (modality {m})"
                else:
                    label = names.get(g, g)
            elif n.startswith("encoders."):
                name = n.split(".")[1]
                label = "VPG (frozen)" if name == "image" else f"{name} encoder (frozen)"
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
    def encode(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs of modality ``name`` -> frozen encoder features (N, K, d_encoder)."""
        return self.encoders[name].encode(inputs.to(self.device))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> frozen image-encoder features (N, K, d_vpg)."""
        return self.encode("image", pixel_values)

    def embed(self, input_ids: torch.Tensor, modality_ids: Optional[torch.Tensor] = None,
              pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
              **modality_inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each modality's slots filled by its projected encoder features.

        input_ids, modality_ids: (B, T). Per modality (:mod:`pill.modalities`), its preprocessed
        inputs under its ``inputs_key`` (image: ``pixel_values`` (N, 3, H, W)) or its cached
        features under its ``features_key`` (``image_features`` (N, K, d)), inputs in order of
        their slots. Returns (B, T, d_llm).
        """
        modality_inputs = {**modality_inputs, "pixel_values": pixel_values, "image_features": image_features}
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, d)
        for name, m in self.modalities.items():
            feats = modality_inputs.get(m.features_key)
            raw = modality_inputs.get(m.inputs_key)
            if feats is None and raw is None:
                if modality_ids is not None and bool((modality_ids == m.id).any()):
                    raise DataError(f"the batch has {m.label} slots (modality {m.id}) but neither "
                                    f"{m.inputs_key} nor {m.features_key}")
                continue
            feats = (feats if feats is not None else self.encode(name, raw)).to(self.device)
            embeds = self._fill(embeds, modality_ids, name, m, feats)
        return embeds

    def _fill(self, embeds: torch.Tensor, modality_ids: torch.Tensor, name: str, m: Modality,
              feats: torch.Tensor) -> torch.Tensor:
        """Write the projected ``feats`` (N, K, d_encoder) of modality ``m`` into its slots of ``embeds``."""
        enc, proj = self.encoders[name], self.pill_projector[name]
        if feats.shape[-1] != proj.in_features or feats.shape[1] != enc.num_tokens:
            raise DataError(f"{m.label} features have shape {tuple(feats.shape)}; this model's {name} encoder "
                            f"gives (N, {enc.num_tokens}, {proj.in_features})")
        slots = modality_ids == m.id  # (B, T)
        n_slots = int(slots.sum())
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise DataError(f"the batch has {n_slots} {m.label}-token slots but {feats.shape[0]} {m.label}(s) x "
                            f"{feats.shape[1]} tokens = {feats.shape[0] * feats.shape[1]}")
        feats = feats.to(proj.weight.dtype)
        if name in self.pill_feature_norm:
            feats = self.pill_feature_norm[name](feats)
        tokens = proj(feats).to(embeds.dtype)  # (N, K, d)
        return embeds.masked_scatter(slots.unsqueeze(-1), tokens.reshape(-1, tokens.shape[-1]))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                modality_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                cache=None, use_cache: bool = False, logits: str = "auto", **modality_inputs) -> VLMOutput:
        """Run the plugged LLM on an interleaved batch.

        Args:
            input_ids, attention_mask, modality_ids, labels: (B, T); labels use -100 where no loss.
            modality_inputs: per modality, its inputs or cached features in slot order (see
                :meth:`embed`: ``pixel_values`` (N, 3, H, W) or ``image_features`` (N, K, d_vpg)).
                Other keys (a batch's ``ids``, ...) are ignored.
            logits: ``all`` (B, T, V), ``last`` (B, V), ``none``, or ``auto`` (``none`` when labels are
                given: the LM head then runs only on answer positions, which saves most of its cost).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, modality_ids,
                                       **{k: v for k, v in modality_inputs.items() if k in self._input_keys})
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
            mask = target != IGNORE_INDEX  # (B, T-1)
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
    def eos_token_ids(self, eos_token_id=None) -> set[int]:
        """The ids that end an answer: ``eos_token_id`` when given, else the generation config's and
        the tokenizer's end-of-sequence ids."""
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
                 modality_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id=None, use_cache: bool = True, streamer: Optional[Callable[[torch.Tensor], None]] = None,
                 generator: Optional[torch.Generator] = None, **modality_inputs) -> torch.Tensor:
        """Greedy (default) or sampled decoding with the KV cache; prompts must be left-padded.

        ``modality_inputs``: each modality's inputs or cached features, as :meth:`embed` takes them
        (``pixel_values=...``). Tokens produced here are text (modality 0). ``streamer(tokens (B,))``
        is called after each step. Returns the new tokens (B, <= max_new_tokens); finished rows are padded with the pad id.
        With ``use_cache=False`` the whole sequence is recomputed at every step (same greedy output).
        """
        input_ids = input_ids.to(self.device)
        B = input_ids.shape[0]
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        modality_ids = None if modality_ids is None else modality_ids.to(self.device)
        embeds = self.embed(input_ids, modality_ids,
                            **{k: v for k, v in modality_inputs.items() if k in self._input_keys})
        eos = self.eos_token_ids(eos_token_id)
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
             max_new_tokens: int = 128, stream: Optional[Callable[[str], None]] = None, *,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None,
             inputs: Optional[dict[str, Sequence]] = None, notice: Optional[Callable[[str], None]] = None) -> str:
        """Answer ``prompt`` about ``images`` (PIL images or paths) and ``inputs`` (other modalities
        by name) after the earlier ``history`` turns ({role, content}, without inputs); placeholders
        are prepended for inputs the prompt does not mention. ``stream(text_piece)`` receives the
        answer as it is produced. The conversation opens with ``self.system_prompt`` (set by
        :func:`pill.build.load_run` from the run's ``data.system_prompt``). One
        :class:`~pill.chat.ChatSession` turn: the CLI and the web demo answer the same way (a
        conversation too long for the context loses its oldest turns; ``notice(message)`` says so)."""
        from .chat import ChatSession

        history = list(history or [])
        system = None
        if history and history[0]["role"] == "system":
            system, history = history[0]["content"], history[1:]
        session = ChatSession(self, max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                              top_p=top_p, seed=seed, system_prompt=system, history=history)
        return session.ask(prompt, images, stream=stream, inputs=inputs, notice=notice).strip()

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
