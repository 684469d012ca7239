"""colreduce-kvprune: exact fused column reductions of softmax attention, and KV-cache pruning after prefill.

Scores: :func:`colreduce` (dense), :func:`colreduce_varlen` (packed batches), :func:`colreduce_paged` (keys read
from a paged KV cache); pure-torch references :func:`colreduce_torch` and friends.
"""
from colreduce_kvprune.ops import colreduce, colreduce_paged, colreduce_varlen
from colreduce_kvprune.reference import colreduce_paged_torch, colreduce_torch, colreduce_varlen_torch

__version__ = "0.1.0"
__all__ = ["colreduce", "colreduce_varlen", "colreduce_paged", "colreduce_torch", "colreduce_varlen_torch",
           "colreduce_paged_torch", "__version__"]
