"""Helpers shared by the HF tests: tiny transformers MPT models with every weight randomised."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import MptConfig, MptForCausalLM


def random_hf_model(seed: int = 0, **config) -> MptForCausalLM:
    """A transformers MptForCausalLM in float32 whose weights (LayerNorms too) are all random, so
    that a transposed, swapped or mis-split tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = MptForCausalLM(MptConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model: MptForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def safetensors_dict(folder: str) -> dict[str, np.ndarray]:
    """All tensors of an HF folder's safetensors files (single or sharded)."""
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def write_bin_checkpoint(folder: str, config: dict, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    """An HF folder in the PyTorch .bin format (what older hub repos such as mosaicml/mpt-7b hold)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    keys = list(state)
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def saved_hf_model(folder, seed: int = 0, **config) -> MptForCausalLM:
    """``random_hf_model`` written to ``folder`` by ``save_pretrained``: a checkpoint as users get it."""
    model = random_hf_model(seed, **config)
    model.save_pretrained(folder)
    return model


def hf_and_loaded(folder, seed: int = 0, **config):
    """(the transformers model, and our (cfg, params) loaded from its saved folder by ``load_hf``
    in float32): the pair every parity test compares."""
    from mpt_jax.hf import load_hf

    model = saved_hf_model(folder, seed, **config)
    return model, *load_hf(folder, dtype="float32")
