"""Triton-language paged attention (``kernel=triton``): K/V store, split-K decode and chunked prefill.

Nothing heavy happens at import: ``triton`` and the kernels load when the hook is called, and a missing
``triton`` package simply means this plugin offers no backend.
"""

from __future__ import annotations

from pagedserve.hookspecs import hookimpl


@hookimpl
def pagedserve_attention_backends():
    try:
        from .backend import TritonAttentionBackend  # imports triton
    except ImportError:
        return []
    return [TritonAttentionBackend]
