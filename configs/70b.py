"""MPT-70B: llm-foundry's mpt-70b.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/70b.py

d_model 8192, 64 heads, 80 layers; lr 8e-05, global batch 2048 x 2048, 333,800 steps (about 1.4T
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=8192,
        n_heads=64,
        n_layers=80,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return pretraining_recipe(config, lr=8e-05, global_batch_size=2048, max_steps=333800, fsdp=True)
