"""Semantic-First Diffusion (SFD): the shared library.

Importing ``sfd`` (or any submodule) has no side effects: no compilation, no prints, no global
flags, no network. Policy (TF32, autocast, compile, fused kernels) is decided by entry scripts,
through ``sfd.runtime``; docs/architecture.md lists every module and its one job.
"""

__version__ = "0.1.0"
