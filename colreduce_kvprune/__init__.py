"""colreduce-kvprune: exact fused column reductions of softmax attention, and KV-cache pruning after prefill."""
__version__ = "0.1.0"
