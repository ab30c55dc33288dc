"""The tiny model and KV layouts the real-scheduler tests run: vLLM's config built offline
(a ``ModelConfig`` from a folder that holds only a tiny model's ``config.json``), per-layer KV
cache specs for each model shape tested, and vLLM's own KV cache planning for them
(``get_kv_cache_configs``), as ``EngineCore`` does it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch
from vllm.config import (
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

BLOCK = 16  # tokens per GPU block
HEADS, HEAD_SIZE = 2, 16
VOCAB = 32000
LAYOUT = KVCacheLayout.LBNHC

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": HEADS,
    "head_dim": HEAD_SIZE, "num_hidden_layers": 2, "vocab_size": VOCAB,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}

def full() -> FullAttentionSpec:
    """A full-attention layer's KV cache spec."""
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.float16)


def window(tokens: int) -> SlidingWindowSpec:
    """A sliding-window layer's KV cache spec."""
    return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.float16, sliding_window=tokens)


def mamba() -> MambaSpec:
    """A Mamba layer's state spec in vLLM's "align" cache mode."""
    return MambaSpec(block_size=BLOCK, shapes=((4, 64), (2, 16, 16)),
                     dtypes=(torch.float16, torch.float32), mamba_cache_mode="align")


# Model layouts tested: the shape of their KV cache groups.
LAYOUTS: dict[str, Callable[[], dict[str, KVCacheSpec]]] = {
    # One full-attention group (Llama, Qwen, Mistral, ...).
    "full": lambda: {f"model.layers.{i}.self_attn.attn": full() for i in range(2)},
    # Full and sliding-window layers alternating (gpt-oss): one group of each.
    "full+swa": lambda: {
        f"model.layers.{i}.self_attn.attn": window(48) if i % 2 == 0 else full()
        for i in range(4)
    },
    # Five sliding-window layers to one full layer (Gemma 3): six groups of one layer.
    "gemma3": lambda: {
        f"model.layers.{i}.self_attn.attn": full() if i % 6 == 5 else window(64)
        for i in range(6)
    },
    # Mamba layers with one attention layer (Jamba, Nemotron-H, Granite 4): four groups.
    "mamba": lambda: {
        f"model.layers.{i}.mixer": full() if i == 3 else mamba() for i in range(4)
    },
}


def model_dir(root: Path) -> str:
    """A folder that holds only a tiny Llama's config.json (vLLM loads nothing else)."""
    d = root / "tiny-llama"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


def make_vllm_config(
    model: str, extra: dict[str, Any], *, layout: str = "full", async_scheduling: bool = False,
    max_num_seqs: int = 8, max_batched_tokens: int = 128, max_model_len: int = 256,
    engine_id: str | None = None, world_size: int = 1, rank: int = 0,
) -> VllmConfig:
    """vLLM's config for the tiny model with kvtier behind the OffloadingConnector."""
    model_config = ModelConfig(model=model, skip_tokenizer_init=True, dtype="float16",
                               max_model_len=max_model_len)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True,
                        mamba_cache_mode="align" if layout == "mamba" else "none")
    cfg = VllmConfig(
        model_config=model_config,
        cache_config=cache,
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len, is_encoder_decoder=False,
            enable_chunked_prefill=True, async_scheduling=async_scheduling,
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both",
            kv_connector_extra_config=extra, engine_id=engine_id,
        ),
    )
    cfg.cache_config.kv_cache_layout = LAYOUT.name
    if world_size > 1:
        cfg.parallel_config.tensor_parallel_size = world_size
        cfg.parallel_config.world_size = world_size
        cfg.parallel_config.rank = rank
    return cfg


def plan_kv_cache(vllm_config: VllmConfig, specs: dict[str, KVCacheSpec],
                  num_gpu_blocks: int) -> tuple[KVCacheConfig, KVCacheConfig, int, int]:
    """vLLM's KV cache plan for ``num_gpu_blocks`` blocks, as EngineCore makes it.

    Returns (worker config, scheduler config, scheduler block size, hash block size).
    """
    vllm_config.cache_config.num_gpu_blocks_override = num_gpu_blocks
    groups = get_global_kv_cache_groups(vllm_config, [specs])
    (worker_cfg,) = get_kv_cache_configs(vllm_config, [specs], [1 << 40], groups)
    worker_cfg.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    sched_cfg = generate_scheduler_kv_cache_config([worker_cfg])
    vllm_config.cache_config.num_gpu_blocks = sched_cfg.num_blocks
    block_size, hash_block_size = resolve_kv_cache_block_sizes(sched_cfg, vllm_config)
    align = resolve_cache_hit_alignment_tokens(sched_cfg, vllm_config, block_size,
                                               hash_block_size)
    for c in (worker_cfg, sched_cfg):
        c.hash_block_size = hash_block_size
        c.cache_hit_alignment_tokens = align
    return worker_cfg, sched_cfg, block_size, hash_block_size
