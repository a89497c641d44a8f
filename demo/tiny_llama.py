"""A tiny Llama-style model with seeded random weights, saved as sharded safetensors (made locally, never downloaded)."""

from __future__ import annotations

import os

# Fixed prompt token ids: the forward pass must be reproducible.
DEMO_TOKEN_IDS = [[1, 17, 42, 7, 99, 3, 250, 64]]


def make_tiny_llama(directory: str | os.PathLike[str], seed: int = 0, shards: int = 3):
    """Save a Llama-style model with random weights from `seed` into `directory` as exactly `shards`
    safetensors shards plus `model.safetensors.index.json`; return the model, in eval mode."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=shards,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    # save_pretrained shards greedily by size; pick the largest limit that gives `shards` files.
    total = sum(t.numel() * t.element_size() for t in state.values())
    for limit in range(total, 0, -max(1, total // 256)):
        if len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors) == shards:
            break
    else:
        raise ValueError(f"cannot split the tiny model into {shards} shards")
    model.save_pretrained(directory, max_shard_size=limit)
    return model
