"""pill.attention: SDPA with the attention of bf16 training on CPU computed in float32."""
import pytest
import torch
import torch.nn.functional as F

from pill import attention
from pill.models import build_llm_from_config
from pill.plug import plug, unplug


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtypes scaled_dot_product_attention computes in (autocast casts its inputs to bf16)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding: the attention mask is used
    return ids, mask


def test_plug_switches_sdpa_and_unplug_restores_it():
    llm = build_llm_from_config("llama")
    assert llm.config._attn_implementation == "sdpa"
    plug(llm)
    assert llm.config._attn_implementation == attention.NAME
    assert llm.model.config._attn_implementation == attention.NAME
    unplug(llm)
    assert llm.config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone():
    llm = build_llm_from_config("llama")
    llm.config._attn_implementation = "eager"
    plug(llm)
    assert llm.config._attn_implementation == "eager"
    unplug(llm)
    assert llm.config._attn_implementation == "eager"


def test_bf16_training_on_cpu_runs_the_attention_in_float32(sdpa_dtypes):
    ids, mask = _batch()
    llm = plug(build_llm_from_config("llama"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = llm(input_ids=ids, attention_mask=mask).logits
    logits.float().sum().backward()
    assert sdpa_dtypes and set(sdpa_dtypes) == {torch.float32}
    assert logits.dtype == torch.bfloat16  # the layer's output keeps autocast's dtype
    assert any(p.grad is not None for n, p in llm.named_parameters() if "pill_" in n)


def test_bf16_inference_keeps_bf16_attention(sdpa_dtypes):
    ids, mask = _batch()
    llm = plug(build_llm_from_config("llama"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        llm(input_ids=ids, attention_mask=mask)
    assert set(sdpa_dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_result_as_sdpa(family):
    """Text-only, the plugged model equals the base model: in float32 exactly as before, and under
    bf16 autocast within bf16 rounding of the base's bf16 SDPA (loss and input gradients)."""
    ids, mask = _batch()
    base = build_llm_from_config(family)
    plugged = plug(build_llm_from_config(family))
    emb_b = base.get_input_embeddings()(ids).detach().requires_grad_()
    emb_p = plugged.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(plugged(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = base(inputs_embeds=emb_b, attention_mask=mask).logits.float()
        lp = plugged(inputs_embeds=emb_p, attention_mask=mask).logits.float()
    lb.logsumexp(-1).sum().backward()
    lp.logsumexp(-1).sum().backward()
    torch.testing.assert_close(lp, lb, rtol=0.05, atol=0.05)
    cos = F.cosine_similarity(emb_p.grad.flatten(), emb_b.grad.flatten(), dim=0)
    assert cos > 0.99


def test_cpu_attention_bench_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "cpu_attention.py"
    spec = importlib.util.spec_from_file_location("cpu_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "a.json"
    r = mod.main(["--batch", "2", "--tokens", "16", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                  "--reps", "1", "--out", str(out)])
    assert set(r["median_ms"]) == {"float32", "bf16_sdpa", "bf16_pill"}
    assert all(v > 0 for v in r["median_ms"].values()) and out.is_file()
