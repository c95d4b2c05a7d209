import pytest
import torch

from pill.modules import ClassicAdapter, ModalityAttentionGate, ModalityExperts, SwiGLUAdapter, build_adapter


@pytest.mark.parametrize("make", [lambda: SwiGLUAdapter(16, 4), lambda: ClassicAdapter(16, 4, "gelu"),
                                  lambda: ClassicAdapter(16, 4, "relu"), lambda: ClassicAdapter(16, 4, "none")])
def test_adapters_start_as_zero_and_learn(make):
    a = make()
    z = torch.randn(3, 5, 16)
    assert torch.equal(a(z), torch.zeros_like(z))
    loss = (a(z) - torch.ones_like(z)).pow(2).mean()
    loss.backward()
    assert a.w_up.weight.grad.abs().sum() > 0  # zero init of W_up still receives gradient


def test_swiglu_formula():
    a = SwiGLUAdapter(8, 3)
    torch.nn.init.normal_(a.w_up.weight)
    z = torch.randn(4, 8)
    expected = (torch.nn.functional.silu(z @ a.w_gate.weight.T) * (z @ a.w_down.weight.T)) @ a.w_up.weight.T
    assert torch.allclose(a(z), expected, atol=1e-6)
    assert sum(p.numel() for p in a.parameters()) == 3 * 8 * 3


def test_unknown_adapter_kind():
    with pytest.raises(ValueError, match="swiglu"):
        build_adapter("lora", 8, 2)
    with pytest.raises(ValueError, match="activation"):
        ClassicAdapter(8, 2, "tanh")


def _randomised_experts(m=2, dim=16, shared=False):
    torch.manual_seed(0)
    e = ModalityExperts(m, lambda: SwiGLUAdapter(dim, 4), shared=shared)
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return e


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_momae_gather_scatter_equals_select_from_all(num_modalities):
    e = _randomised_experts(num_modalities)
    x = torch.randn(3, 7, 16, requires_grad=True)
    mods = torch.randint(0, num_modalities, (3, 7))
    out = e(x, mods)
    ref = e.forward_dense(x, mods)
    assert torch.allclose(out, ref, atol=1e-6)
    # and per token, by hand
    for b in range(3):
        for t in range(7):
            assert torch.allclose(out[b, t], e.experts[int(mods[b, t])](x[b, t]), atol=1e-6)
    # gradients agree too
    g1 = torch.autograd.grad(out.sum(), [x] + list(e.parameters()))
    g2 = torch.autograd.grad(ref.sum(), [x] + list(e.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_momae_each_token_pays_for_one_expert_only():
    e = _randomised_experts(2)
    seen = []
    for i, ex in enumerate(e.experts):
        ex.register_forward_hook(lambda mod, inp, out, i=i: seen.append((i, inp[0].shape[0])))
    mods = torch.tensor([[0, 1, 1, 0, 0]])
    e(torch.randn(1, 5, 16), mods)
    assert sorted(seen) == [(0, 3), (1, 2)]


def test_momae_single_modality_fast_path_and_none():
    e = _randomised_experts(2)
    x = torch.randn(2, 4, 16)
    assert torch.allclose(e(x, None), e.experts[0](x))
    assert torch.allclose(e(x, torch.ones(2, 4, dtype=torch.long)), e.experts[1](x))


def test_momae_rejects_unknown_modality():
    e = _randomised_experts(2)
    with pytest.raises(ValueError, match="modality_ids"):
        e(torch.randn(1, 3, 16), torch.tensor([[0, 1, 2]]))


def test_shared_adapter_ablation():
    e = _randomised_experts(2, shared=True)
    assert len(e.experts) == 1
    x = torch.randn(1, 3, 16)
    assert torch.allclose(e(x, torch.tensor([[0, 1, 0]])), e.experts[0](x))


@pytest.mark.parametrize("variant", ["token", "head"])
def test_gate_zero_init_zeroes_visual_values_only(variant):
    g = ModalityAttentionGate(16, num_kv_heads=2, variant=variant)
    a = torch.randn(2, 5, 16)
    v = torch.randn(2, 5, 2 * 4)
    visual = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    out = g(a, v.clone(), visual)
    assert torch.equal(out[visual], torch.zeros_like(out[visual]))
    assert torch.equal(out[~visual], v[~visual])


def test_token_gate_is_per_token_and_head():
    g = ModalityAttentionGate(16, num_kv_heads=2, variant="token")
    torch.nn.init.normal_(g.w_gate.weight)
    a = torch.randn(1, 3, 16)
    v = torch.randn(1, 3, 2 * 4)
    visual = torch.tensor([[False, True, True]])
    out = g(a, v.clone(), visual)
    gates = torch.tanh(a @ g.w_gate.weight.T)  # (1, 3, 2)
    expected = v.view(1, 3, 2, 4) * gates[..., None]
    assert torch.allclose(out.view(1, 3, 2, 4)[visual], expected[visual], atol=1e-6)
    assert sum(p.numel() for p in g.parameters()) == 16 * 2
    assert sum(p.numel() for p in ModalityAttentionGate(16, 2, "head").parameters()) == 2


def _dense_gate(g: ModalityAttentionGate, a, v, visual):
    """Reference formula: every row scaled by tanh(g) where visual, by 1 elsewhere."""
    gates = g.gates(a)  # (B, T, n_kv)
    scale = torch.where(visual.unsqueeze(-1), gates, torch.ones_like(gates))
    B, T, _ = v.shape
    return (v.view(B, T, g.num_kv_heads, -1) * scale.unsqueeze(-1)).view(B, T, -1)


@pytest.mark.parametrize("variant", ["token", "head"])
def test_gate_on_visual_rows_equals_dense_formula_values_and_gradients(variant):
    torch.manual_seed(0)
    g = ModalityAttentionGate(16, num_kv_heads=2, variant=variant)
    for p in g.parameters():
        torch.nn.init.normal_(p)
    proj = torch.nn.Linear(16, 8)  # v comes out of a linear layer, as v_proj's output does
    a = torch.randn(2, 5, 16, requires_grad=True)
    visual = torch.tensor([[False, True, True, False, False], [True, False, False, False, True]])
    w = torch.randn(2, 5, 8)

    def run(fn):
        for t in [a, *g.parameters(), *proj.parameters()]:
            t.grad = None
        out = fn(g, a, proj(a), visual)
        (out * w).sum().backward()
        return out.detach(), [t.grad.clone() for t in [a, *g.parameters(), *proj.parameters()]]

    out, grads = run(lambda m, *x: m(*x))
    ref, ref_grads = run(_dense_gate)
    assert torch.allclose(out, ref, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_gate_without_visual_rows_returns_values_unchanged():
    g = ModalityAttentionGate(16, num_kv_heads=2)
    v = torch.randn(1, 3, 8)
    g.record = True
    assert torch.equal(g(torch.randn(1, 3, 16), v.clone(), torch.zeros(1, 3, dtype=torch.bool)), v)
    assert g.last_abs_gate is None
