"""MPT-7B-Instruct: finetune MPT-7B on instruction data, as llm-foundry's mpt-7b_dolly_sft.yaml.

    python -m mpt_jax.convert hf_to_jax mosaicml/mpt-7b ckpt/mpt-7b
    python -m mpt_jax.train --config=configs/7b_instruct.py --config.data.source=files:/data/dolly_hhrlhf/train.jsonl

Data: jsonl records {"prompt": ..., "response": ...} (mosaicml/dolly_hhrlhf exported to jsonl), in
the MPT-7B-Instruct template, loss on the response only, examples packed first-fit into 2048 tokens,
each attending only to itself (model.attn_uses_sequence_id, set by finetuning_recipe).
Recipe (the yaml's): decoupled AdamW lr 5e-6, betas (0.9, 0.999), no weight decay, linear decay to 0
after 50 warmup steps, clipping 1.0, global batch 48, 2 epochs (about 2,500 steps for ~59k examples).
"""

import ml_collections

from mpt_jax.config import RELEASED_SHAPES, MPTConfig
from mpt_jax.run_config import base_config, finetuning_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(**RELEASED_SHAPES["mpt-7b"], dtype="bfloat16", remat_policy="full").to_config_dict()
    config.data.format = "instruction"
    config.data.template = "mpt-7b-instruct"
    return finetuning_recipe(
        config,
        init_from="ckpt/mpt-7b",
        source="files:data/dolly_hhrlhf/train.jsonl",
        lr=5e-6,
        b2=0.999,
        global_batch_size=48,
        max_steps=2500,
        seq_len=2048,
    )
