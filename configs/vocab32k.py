"""Benchmark shape with a real vocabulary: d 256, 4 heads, 4 layers, d_ff 1024, vocabulary 32101 (the
T5 tokenizer's size), 16 x 256 tokens. Used by `benchmarks/probe_overhead.py` to measure what capture
costs when the logits dominate; it trains on the byte data like `small` (bytes use the first 257 ids)."""

import ml_collections

from configs import small


def get_config() -> ml_collections.ConfigDict:
    """Returns the vocabulary-32101 benchmark configuration."""
    c = small.get_config()
    c.name = "vocab32k"
    c.model.d_model = 256
    c.model.num_heads = 4
    c.model.d_ff = 1024
    c.model.vocab_size = 32101
    c.model.max_len = 256
    c.data.seq_len = 256
    return c
