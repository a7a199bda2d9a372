"""MPT-30B-Instruct: finetune MPT-30B on instruction data, as llm-foundry's mpt-30b-instruct.yaml.

    python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b ckpt/mpt-30b
    python -m mpt_jax.train --config=configs/30b_instruct.py --config.data.source=files:/data/instruct-v3/train.jsonl

Data: jsonl {"prompt", "response"} (mosaicml/instruct-v3 exported to jsonl) in the MPT-30B-Instruct
template, loss on the response only, packed first-fit into 8192 tokens, each example attending
only to itself (model.attn_uses_sequence_id, set by finetuning_recipe). Recipe (the yaml's):
decoupled AdamW lr 9.65e-6, betas (0.9, 0.95), no weight decay, linear decay to 0 after 50 warmup
steps, clipping 1.0, global batch 72, 8 epochs.

Sized for one node of 8 x 80 GB, as the yaml's FSDP PURE bfloat16 run: FSDP over the 8 devices,
micro-batches of 1 row of 8192 per device (9 accumulation steps), gradients and their sum in
bfloat16 (train.grad_dtype), AdamW's first moment in bfloat16 (optimizer.mu_dtype), the flash
kernel on GPUs (attn_impl="auto"; the yaml's triton). `python -m mpt_jax.plan
--config=configs/30b_instruct.py --devices=8 --compile` plans 72.2 GiB per device and compiles
(XLA, 8 CPU devices) to a 67.1 GiB peak (docs/sharding.md, "MPT-30B on one 8 x 80 GB node"); with
float32 gradients and moments (--config.train.grad_dtype=float32 --config.optimizer.mu_dtype=float32,
for more devices) it plans 88.5 GiB and does not fit.
"""

import ml_collections

from mpt_jax.config import RELEASED_SHAPES, MPTConfig
from mpt_jax.run_config import base_config, finetuning_recipe, one_node_pure_bf16


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        **RELEASED_SHAPES["mpt-30b"],
        dtype="bfloat16",
        remat_policy="full",
        attn_impl="auto",  # the flash kernel on GPUs (llm-foundry: triton): no [64, 8192, 8192] scores
    ).to_config_dict()
    config.data.format = "instruction"
    config.data.template = "mpt-30b-instruct"
    config = finetuning_recipe(
        config,
        init_from="ckpt/mpt-30b",
        source="files:data/instruct-v3/train.jsonl",
        lr=9.65e-6,
        global_batch_size=72,
        max_steps=4000,
        seq_len=8192,
    )
    # One node of 8 x 80 GB: 9 accumulation steps of 1 row of 8192 tokens per device.
    return one_node_pure_bf16(config, micro_batch_size=8)
