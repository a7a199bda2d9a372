"""MPT-3B: the shape of llm-foundry's mpt-3b.yaml (20 heads, head_dim 128).

Released-MPT architecture at this shape (see docs/configs.md).

Parameters: see `python -m mpt_jax.summary --config=configs/3b.py`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=2560,
        n_heads=20,
        n_layers=32,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return config
