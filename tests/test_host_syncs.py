"""Nothing in the per-layer path waits on the host: the calls that read a device value back
(``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero()``, ...; each a host-device sync
on CUDA) run a fixed number of times per forward, the same for 2 and for 4 decoder layers."""
import pytest
import torch

from pill import PillConfig
from pill.encoders.efficientnet import EfficientNetVPG
from pill.models import build_llm_from_config
from pill.modules import route
from pill.vlm import PillVLM

# Tensor methods and torch functions whose result depends on device values read on the host.
METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "nonzero", "argwhere",
           "bincount", "unique", "unique_consecutive", "masked_select", "equal", "allclose")
FUNCTIONS = ("nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select", "equal",
             "allclose")


class HostSyncCounter:
    """Counts, by name, the calls that read device data on the host, boolean-mask indexing and
    ``repeat_interleave`` without ``output_size`` included.

    The methods are patched on ``torch.Tensor`` (not a TorchFunctionMode, which is thread-local
    and misses what the backward pass runs: the recomputation of checkpointed plug-ins)."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self._saved: list = []

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _wrap(self, owner, name: str, test=None) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if test is None or test(args, kwargs):
                self._count(name)
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self) -> "HostSyncCounter":
        for name in METHODS:
            self._wrap(torch.Tensor, name)
        for name in FUNCTIONS:
            self._wrap(torch, name)
        self._wrap(torch.Tensor, "__getitem__", lambda a, k: _has_bool_index(a[1]))
        repeats = lambda a, k: torch.is_tensor(a[1] if len(a) > 1 else k.get("repeats")) and "output_size" not in k
        self._wrap(torch.Tensor, "repeat_interleave", repeats)
        self._wrap(torch, "repeat_interleave", repeats)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _vlm(layers: int, **cfg) -> PillVLM:
    llm = build_llm_from_config("llama", num_hidden_layers=layers)
    torch.manual_seed(0)
    vlm = PillVLM(llm, EfficientNetVPG(pretrained=False, pool=2), None, PillConfig(**cfg))
    torch.manual_seed(1)
    for n, p in vlm.named_parameters():
        if "pill_" in n:
            torch.nn.init.normal_(p, std=0.05)
    return vlm


def _batch(vlm: PillVLM, B: int = 2, T: int = 12) -> dict:
    K = vlm.encoders["image"].num_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (B, T), generator=g)
    mods = torch.zeros(B, T, dtype=torch.long)
    mods[:, 1:1 + K] = 1
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    feats = torch.randn(B, K, vlm.encoders["image"].dim, generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), modality_ids=mods, labels=labels,
                image_features=feats)


def _training_syncs(layers: int, stage: str, recompute: bool, **cfg) -> dict:
    vlm = _vlm(layers, **cfg).train()
    vlm.set_stage(stage)
    vlm.enable_plugin_recompute(recompute)
    batch = _batch(vlm)
    with HostSyncCounter() as c:
        vlm(**batch).loss.backward()
    return c.calls


def _generation_syncs(layers: int, new_tokens: int) -> dict:
    vlm = _vlm(layers).eval()
    b = _batch(vlm, B=1)
    with HostSyncCounter() as c:
        out = vlm.generate(b["input_ids"], b["attention_mask"], b["modality_ids"], max_new_tokens=new_tokens,
                           eos_token_id=[], image_features=b["image_features"])
    assert out.shape == (1, new_tokens)
    return c.calls


def test_the_counter_sees_the_routing_sync():
    mods = torch.tensor([[0, 1, 1, 0, 2]])
    with HostSyncCounter() as c:
        r = route(mods, 3)
    assert c.calls == {"tolist": 1}  # one read of the per-modality counts, whatever the modalities
    assert [x.tolist() for x in r.rows] == [[0, 3], [1, 2], [4]] and r.visual.tolist() == [1, 2, 4]
    with HostSyncCounter() as c:
        (mods == 1).nonzero()
        bool(mods.any())
        mods[mods > 0]
    assert c.calls == {"nonzero": 1, "__bool__": 1, "__getitem__": 1}


def test_the_counter_sees_what_the_backward_pass_runs():
    from torch.utils.checkpoint import checkpoint

    def body(x):
        x.sum().tolist()
        return x.sin()  # saves x: the backward pass recomputes body

    x = torch.randn(3, requires_grad=True)
    with HostSyncCounter() as c:
        checkpoint(body, x, use_reentrant=False).sum().backward()  # body runs again in backward
    assert c.calls == {"tolist": 2}


@pytest.mark.parametrize("stage,recompute,cfg", [("finetune", True, {}), ("finetune", False, {}),
                                                 ("align", True, {}), ("finetune", True, {"gate": "head"}),
                                                 ("finetune", True, {"momae": False})])
def test_training_step_syncs_do_not_grow_with_layers(stage, recompute, cfg):
    two, four = _training_syncs(2, stage, recompute, **cfg), _training_syncs(4, stage, recompute, **cfg)
    assert two == four, (two, four)
    assert sum(two.values()) <= 8, two  # a handful per forward: the embedding's slot check, the loss's mask


def test_decoding_syncs_do_not_grow_with_layers():
    two, four = _generation_syncs(2, 3), _generation_syncs(4, 3)
    assert two == four, (two, four)
    # and per generated token a constant too: the stop test only
    longer = _generation_syncs(2, 5)
    per_token = {k: (longer.get(k, 0) - two.get(k, 0)) / 2 for k in set(longer) | set(two)}
    assert sum(per_token.values()) <= 2, per_token
