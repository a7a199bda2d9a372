"""MPT-70B: the shape of llm-foundry's mpt-70b.yaml.

Released-MPT architecture at this shape (see docs/configs.md).

Parameters: see `python -m mpt_jax.summary --config=configs/70b.py`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=8192,
        n_heads=64,
        n_layers=80,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return config
