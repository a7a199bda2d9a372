"""MPT-350M: the shape of llm-foundry's mpt-350m.yaml.

Released-MPT architecture at this shape (see docs/configs.md).

Parameters: see `python -m mpt_jax.summary --config=configs/350m.py`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=1024,
        n_heads=16,
        n_layers=24,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    return config
