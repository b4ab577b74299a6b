"""Evaluation: held-out perplexity per domain and lm-evaluation-harness tasks offline."""
