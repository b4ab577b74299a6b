"""Serving a ReadME model: scheduling, expert caching and prefetching, workloads, metrics.

The pre-gating router runs before the backbone, so every token's expert is known as soon as
the token is: a prompt's experts at admission, each generated token's right after it is
sampled. Everything in this package except the engine and runner works from those expert ids
alone, through small dataclasses (``types``), so the real engine and the discrete-event
simulator (``sim``) drive the very same scheduler and cache objects.
"""
