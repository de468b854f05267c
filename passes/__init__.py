"""Squeeze passes: graph rewrites that make a model smaller (quantize, prune, low-rank)."""
