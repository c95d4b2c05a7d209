"""Adapters that let other tools drive pill models (each needs its tool's optional extra)."""
