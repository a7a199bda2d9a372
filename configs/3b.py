"""MPT-3B: llm-foundry's mpt-3b.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/3b.py

d_model 2560, 20 heads, 32 layers; lr 0.00016, global batch 512 x 2048, 51,500 steps (about 54B
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=2560,
        n_heads=20,
        n_layers=32,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return pretraining_recipe(config, lr=0.00016, global_batch_size=512, max_steps=51500, fsdp=True)
