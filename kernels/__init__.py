"""Batched multi-LoRA kernels (Triton on CUDA) and their pure-torch references (the CPU path)."""

from kernels.lora import (
    LoraShapeError,
    Runs,
    Segments,
    SlotWeights,
    TokenGroups,
    add_lora,
    add_lora_runs,
    kernel_backend,
    lora_expand,
    lora_expand_ref,
    lora_expand_sgmv,
    lora_expand_sgmv_ref,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_sgmv,
    lora_shrink_sgmv_ref,
    prefers_segments,
    runs_of,
    segments_from_token_slots,
    slot_weights,
    token_groups,
)

__all__ = [
    "LoraShapeError", "Runs", "Segments", "SlotWeights", "TokenGroups", "add_lora", "add_lora_runs", "kernel_backend", "lora_expand", "lora_expand_ref",
    "lora_expand_sgmv", "lora_expand_sgmv_ref", "lora_shrink", "lora_shrink_ref", "lora_shrink_sgmv",
    "lora_shrink_sgmv_ref", "prefers_segments", "runs_of", "segments_from_token_slots",
    "slot_weights", "token_groups",
]
