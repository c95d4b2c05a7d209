"""``torch.compile`` of the plugged model's layers (``train.compile``): same loss and gradients as
eager, no graph break, parameter names unchanged."""
import pytest
import torch

from pill.errors import ConfigError
from pill.runconfig import TrainConfig

from test_host_syncs import _batch, _vlm
from test_train import feature_dir, synth_root, tiny_config  # noqa: F401 (fixtures)


def _loss_and_grads(vlm, batch):
    vlm.zero_grad(set_to_none=True)
    loss = vlm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}


def _eager_vs_compiled(backend: str, stage: str = "finetune"):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    vlm = _vlm(2).train()
    vlm.set_stage(stage)
    vlm.enable_plugin_recompute(True)
    batch = _batch(vlm)
    names = [n for n, _ in vlm.named_parameters()]
    loss, grads = _loss_and_grads(vlm, batch)
    vlm.compile_layers(backend=backend)
    assert [n for n, _ in vlm.named_parameters()] == names  # compiled in place: checkpoints unaffected
    closs, cgrads = _loss_and_grads(vlm, batch)
    assert torch.allclose(closs, loss, rtol=1e-5, atol=1e-5), (float(closs), float(loss))
    assert grads.keys() == cgrads.keys()
    for n in grads:
        assert torch.allclose(cgrads[n], grads[n], rtol=1e-4, atol=1e-6), n
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    # another batch length and another number of image rows: recompiles at most, same as eager
    other = _batch(vlm, B=3, T=16)
    closs2 = vlm(**other).loss.detach()
    for layer in vlm.decoder.layers:
        layer._compiled_call_impl = None  # back to eager
    assert torch.allclose(closs2, vlm(**other).loss.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["finetune", "align"])
def test_compiled_layers_trace_without_graph_breaks_and_match_eager(stage):
    _eager_vs_compiled("eager", stage)  # dynamo's tracing, no code generation: seconds


@pytest.mark.slow  # inductor's C++ code generation: over a minute on 2 CPU cores
def test_inductor_compiled_layers_match_eager():
    _eager_vs_compiled("inductor")


def test_train_compile_is_a_validated_field():
    assert TrainConfig.from_dict({"data": {"root": "."}}).train.compile is False
    assert TrainConfig.from_dict({"data": {"root": "."}, "train": {"compile": True}}).train.compile is True
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig.from_dict({"data": {"root": "."}, "train": {"compile": "often"}})


def test_setup_compiles_the_layers_when_train_compile_is_on(tmp_path, synth_root, feature_dir):
    from pill.train.loop import setup

    cfg = TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **{"train.compile": True}))
    s = setup(cfg, tmp_path / "run", progress=False)
    assert all(layer._compiled_call_impl is not None for layer in s.vlm.decoder.layers)
    off = setup(TrainConfig.from_dict(tiny_config(synth_root, feature_dir)), tmp_path / "run2", progress=False)
    assert all(layer._compiled_call_impl is None for layer in off.vlm.decoder.layers)
