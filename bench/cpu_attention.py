"""Attention forward + backward on CPU: float32, bf16 autocast through transformers' SDPA, and bf16
autocast through pill's attention (pill.attention: float32 inside), interleaved (see BENCHMARKS.md,
"bf16 on CPU").

    python bench/cpu_attention.py                       # SmolLM2-135M's shapes in the CPU demo
    python bench/cpu_attention.py --batch 4 --tokens 512 --heads 9 --kv-heads 3 --out a.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per contender")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pill.attention import attention

    B, H, K, T, D = args.batch, args.heads, args.kv_heads, args.tokens, args.head_dim
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // K, True
    torch.manual_seed(0)
    q0, k0, v0 = torch.randn(B, H, T, D), torch.randn(B, K, T, D), torch.randn(B, K, T, D)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    mask[0, :, :, : T // 4] = False  # a left-padded row, as in a length-grouped batch
    mask[0, :, : T // 4, : T // 4] = torch.eye(T // 4, dtype=torch.bool)  # padding rows see themselves

    def run(fn, autocast: bool):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(module, q, k, v, mask)
        out.float().sum().backward()
        return out

    contenders = {"float32": (sdpa_attention_forward, False), "bf16_sdpa": (sdpa_attention_forward, True),
                  "bf16_pill": (attention, True)}
    for fn, ac in contenders.values():  # warm-up
        run(fn, ac), run(fn, ac)
    times = {name: [] for name in contenders}
    for r in range(args.reps):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            t = time.perf_counter()
            run(*contenders[name])
            times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    result = {"shape": dict(batch=B, heads=H, kv_heads=K, tokens=T, head_dim=D),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "median_ms": med, "bf16_sdpa_over_float32": med["bf16_sdpa"] / med["float32"],
              "bf16_pill_over_bf16_sdpa": med["bf16_pill"] / med["bf16_sdpa"]}
    for n, v in med.items():
        print(f"{n:10s} {v:7.2f} ms (forward + backward, median of {args.reps})")
    print(f"bf16 SDPA / float32: {result['bf16_sdpa_over_float32']:.2f}x; "
          f"pill's bf16 / bf16 SDPA: {result['bf16_pill_over_bf16_sdpa']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
