"""MPT-1B: llm-foundry's mpt-1b.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/1b.py

d_model 2048, 16 heads, 24 layers; lr 0.0002, global batch 512 x 2048, 24,800 steps (about 26B
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=2048,
        n_heads=16,
        n_layers=24,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    return pretraining_recipe(config, lr=0.0002, global_batch_size=512, max_steps=24800, fsdp=True)
