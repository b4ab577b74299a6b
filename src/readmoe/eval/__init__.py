"""Evaluation: held-out perplexity per domain (and later task benchmarks)."""
