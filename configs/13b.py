"""MPT-13B: the shape of llm-foundry's mpt-13b.yaml.

Released-MPT architecture at this shape (see docs/configs.md).

Parameters: see `python -m mpt_jax.summary --config=configs/13b.py`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=5120,
        n_heads=40,
        n_layers=40,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return config
