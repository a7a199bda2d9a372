"""MPT-125M: llm-foundry's mpt-125m.yaml (shape and recipe) on the released MPT architecture.

    python -m mpt_jax.train --config=configs/125m.py

d_model 768, 12 heads, 12 layers; lr 0.0006, global batch 256 x 2048, 4,800 steps (about 2.5B
tokens). The rest of the recipe is run_config.pretraining_recipe; the architecture is in docs/configs.md.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=768,
        n_heads=12,
        n_layers=12,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    return pretraining_recipe(config, lr=0.0006, global_batch_size=256, max_steps=4800, fsdp=False)
