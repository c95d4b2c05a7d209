"""Benchmarks of pill against the frozen-model bound, LoRA, full fine-tuning and the reference code.

Run ``python bench/run.py [--quick] [--out FILE.json]``; see ``BENCHMARKS.md``.
"""
