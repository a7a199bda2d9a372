"""MPT-30B, exactly the released mosaicml/mpt-30b (and -instruct, -chat) architecture.

d_model 7168, 64 heads (head_dim 112), 48 layers, max_seq_len 8192, vocabulary 50432, ALiBi,
no biases: 29,957,200,896 parameters. (llm-foundry's public mpt-30b.yaml has 56 heads; the
released model has 64.) Training recipe: the yaml's (decoupled AdamW lr 1e-4, betas (0.9, 0.95),
cosine with 100 warmup steps to 0.1x, clipping 1.0, batch 2048 x 2048, 143,100 steps). Load the
released weights with
`python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b DIR`.

On one node of 8 x 80 GB (docs/sharding.md, "MPT-30B on one 8 x 80 GB node"), FSDP over the 8 with
micro-batches of 4 rows per device, bfloat16 gradients, a bfloat16 first moment and the flash kernel:

    python -m mpt_jax.plan --config=configs/30b.py --devices=8 --config.train.micro_batch_size=32 \
        --config.train.grad_dtype=bfloat16 --config.optimizer.mu_dtype=bfloat16 \
        --config.model.attn_impl=auto --compile

plans 72.2 GiB per device and compiles (XLA, 8 CPU devices) to a 67.1 GiB peak; the defaults
(float32 gradients, accumulating) plan 81.5 GiB at 1 row per device and do not fit.
"""

import ml_collections

from mpt_jax.config import RELEASED_SHAPES, MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        **RELEASED_SHAPES["mpt-30b"],
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    # llm-foundry's mpt-30b.yaml recipe at 2k context (the released model's first stage); its second
    # stage continued at 8k: --config.train.seq_len=8192 --config.train.global_batch_size=512.
    return pretraining_recipe(config, lr=1.0e-4, global_batch_size=2048, max_steps=143100, fsdp=True)
