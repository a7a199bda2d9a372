"""MPT-30B, exactly the released mosaicml/mpt-30b (and -instruct, -chat) architecture.

d_model 7168, 64 heads (head_dim 112), 48 layers, max_seq_len 8192, vocabulary 50432, ALiBi,
no biases: 29,957,200,896 parameters. (llm-foundry's public mpt-30b.yaml has 56 heads; the
released model has 64.) Load the released weights with
`python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b DIR`.
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=7168,
        n_heads=64,
        n_layers=48,
        max_seq_len=8192,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    return config
