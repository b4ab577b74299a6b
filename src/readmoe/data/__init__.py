"""Domain corpora: the built-in real-text build, the shared train/held-out split, and the
reader every later stage uses (`load_corpus`)."""

from readmoe.data.corpus import (
    DEFAULT_HELDOUT_FRACTION,
    Corpus,
    assign_splits,
    build_corpus,
    load_corpus,
    split_of,
)
from readmoe.data.sources import DOMAINS, default_cache_dir

__all__ = ["DEFAULT_HELDOUT_FRACTION", "DOMAINS", "Corpus", "assign_splits", "build_corpus",
           "default_cache_dir", "load_corpus", "split_of"]
