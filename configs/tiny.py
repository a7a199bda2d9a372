"""A tiny MPT trained on the CPU: the README's main job.

    python -m mpt_jax.train --config=configs/tiny.py [--workdir=workdirs/tiny]

Same architecture as the released MPTs (ALiBi, no biases, tied embeddings) at 5.3M parameters:
d_model 256, 4 heads, 4 layers, an 8192-token byte-level BPE trained on the embedded corpus (the
Python standard library's source), embedding rows 8256. On 2 CPU cores it takes about 3-4 minutes:
240 steps of 16 x 128 tokens with decoupled AdamW at 3e-3 (cosine, 24 warmup steps). Measured:
training loss 9.93 at step 1, about 5 at the end (noisy: each batch is 2k tokens of source code);
eval loss 5.27, 3.95, 3.52 at steps 80, 160, 240.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=256,
        n_heads=4,
        n_layers=4,
        max_seq_len=256,
        vocab_size=8256,  # the 8192-token BPE + room for added tokens (ChatML), as MPT's 50432 > 50277
    ).to_config_dict()
    config.train.max_steps = 240
    config.train.global_batch_size = 16
    config.train.seq_len = 128
    config.train.log_every = 10
    config.train.eval_every = 80
    config.train.eval_batches = 4
    config.optimizer.lr = 3e-3
    config.optimizer.weight_decay = 0.0
    config.schedule.t_warmup = 24
    config.schedule.alpha_f = 0.1
    config.checkpoint.every_steps = 80
    config.checkpoint.keep = 2
    return config
