"""Tiny random decoder-only models for the tests: the package's own builder (colreduce_kvprune.tiny_model), which
the `colreduce-kvprune run` default uses too. See that module for the shape."""
from colreduce_kvprune.tiny_model import KINDS, make_tiny_model, tiny_config

__all__ = ["KINDS", "make_tiny_model", "tiny_config"]
