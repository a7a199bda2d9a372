"""MPT-760M: llm-foundry's mpt-760m.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/760m.py

d_model 1536, 12 heads, 24 layers; lr 0.00025, global batch 256 x 2048, 29,000 steps (about 15.2B
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=1536,
        n_heads=12,
        n_layers=24,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    return pretraining_recipe(config, lr=0.00025, global_batch_size=256, max_steps=29000, fsdp=False)
