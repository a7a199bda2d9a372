"""MPT-760M: the shape of llm-foundry's mpt-760m.yaml (12 heads, head_dim 128).

Released-MPT architecture at this shape (see docs/configs.md).

Parameters: see `python -m mpt_jax.summary --config=configs/760m.py`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=1536,
        n_heads=12,
        n_layers=24,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    return config
