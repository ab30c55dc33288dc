"""Replaying through vLLM 0.33's own TieringOffloadingManager (CPU + its ``fs`` tier)."""

from __future__ import annotations


def vllm_unavailable() -> str | None:
    """Why vLLM's tiering manager cannot be used here, or None when it can."""
    try:
        from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of vllm
        return f"{type(e).__name__}: {e}"
    return None
