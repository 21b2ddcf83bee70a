"""Fused Triton kernels, their eager references, and the dispatch between them."""
