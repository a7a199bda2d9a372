"""MPT-7B, exactly the released mosaicml/mpt-7b (and -instruct, -chat) architecture.

d_model 4096, 32 heads (head_dim 128), 32 layers, max_seq_len 2048, vocabulary 50432, ALiBi,
no biases: 6,649,286,656 parameters. For longer contexts raise max_seq_len (ALiBi extrapolates):
`--config.model.max_seq_len=4096`. Load the released weights with
`python -m mpt_jax.convert hf_to_jax mosaicml/mpt-7b DIR`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=4096,
        n_heads=32,
        n_layers=32,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return config
