"""MPT-13B: llm-foundry's mpt-13b.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/13b.py

d_model 5120, 40 heads, 40 layers; lr 0.0001, global batch 1024 x 2048, 124,000 steps (about 270B
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=5120,
        n_heads=40,
        n_layers=40,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return pretraining_recipe(config, lr=0.0001, global_batch_size=1024, max_steps=124000, fsdp=True)
