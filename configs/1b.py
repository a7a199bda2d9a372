"""MPT-1B: the shape and recipe of llm-foundry's mpt-1b.yaml, on the released MPT architecture.

    python -m mpt_jax.train --config=configs/1b.py

Model: d_model 2048, 16 heads, 24 layers, context 2048 (see docs/configs.md for the architecture).
Recipe (the yaml's): decoupled AdamW lr 0.0002, betas (0.9, 0.95), no weight decay, cosine schedule
with 100 warmup steps to 0.1x, gradient clipping 1.0, global batch 512 x 2048 tokens, 24,800 steps
(about 26B tokens, Chinchilla-style), bfloat16 compute. Data: C4 (English) prepared for TFDS in
ArrayRecord format, tokenized with EleutherAI/gpt-neox-20b.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=2048,
        n_heads=16,
        n_layers=24,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="none",
    ).to_config_dict()
    config.data.source = "tfds:c4/en"
    config.data.tokenizer = "EleutherAI/gpt-neox-20b"
    config.train.max_steps = 24800
    config.train.global_batch_size = 512
    config.train.seq_len = 2048
    config.train.eval_every = 1000
    config.optimizer.lr = 0.0002
    config.schedule.t_warmup = 100
    config.schedule.alpha_f = 0.1
    config.checkpoint.every_steps = 1000
    config.mesh.data = 1
    config.mesh.fsdp = -1  # FULL_SHARD, as llm-foundry's FSDP
    return config
