"""MPT-30B-Instruct: finetune MPT-30B on instruction data, as llm-foundry's mpt-30b-instruct.yaml.

    python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b ckpt/mpt-30b
    python -m mpt_jax.train --config=configs/30b_instruct.py --config.data.source=files:/data/instruct-v3/train.jsonl

Data: jsonl {"prompt", "response"} (mosaicml/instruct-v3 exported to jsonl) in the MPT-30B-Instruct
template, loss on the response only, packed first-fit into 8192 tokens, each example attending
only to itself (model.attn_uses_sequence_id, set by finetuning_recipe). Recipe (the yaml's):
decoupled AdamW lr 9.65e-6, betas (0.9, 0.95), no weight decay, linear decay to 0 after 50 warmup
steps, clipping 1.0, global batch 72, 8 epochs.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config, finetuning_recipe


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192, vocab_size=50432, dtype="bfloat16", remat_policy="full"
    ).to_config_dict()
    config.data.format = "instruction"
    config.data.template = "mpt-30b-instruct"
    return finetuning_recipe(
        config,
        init_from="ckpt/mpt-30b",
        source="files:data/instruct-v3/train.jsonl",
        lr=9.65e-6,
        global_batch_size=72,
        max_steps=4000,
        seq_len=8192,
    )
