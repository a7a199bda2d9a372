"""A tiny MPT for CPU: the README's main job and the tests' default model.

Same architecture as the released MPTs (ALiBi, no biases, tied embeddings) at a size that trains
on 2 CPU cores: d_model 256, 4 heads, 4 layers, context 256, vocabulary 8192 (the byte-level BPE
trained on the embedded corpus). About 5.2M parameters.

    python -m mpt_jax.summary --config=configs/tiny.py
"""

import ml_collections

from mpt_jax.config import MPTConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=256,
        n_heads=4,
        n_layers=4,
        max_seq_len=256,
        vocab_size=8192,
    ).to_config_dict()
    return config
