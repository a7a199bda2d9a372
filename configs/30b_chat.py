"""MPT-30B-Chat: finetune MPT-30B on multi-turn ChatML conversations.

    python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b ckpt/mpt-30b
    python -m mpt_jax.train --config=configs/30b_chat.py --config.data.source=files:/data/chat/train.jsonl

Data: jsonl {"messages": [{"role", "content"}, ...]} rendered as ChatML
(<|im_start|>role\\ncontent<|im_end|>\\n), loss on assistant turns only; <|im_start|> and <|im_end|>
are added to the gpt-neox-20b tokenizer (ids 50277 and 50278, inside MPT's 50432 embedding rows);
MPT-30B-Chat's default system prompt is added where a conversation has none; conversations are
packed first-fit, each attending only to itself (model.attn_uses_sequence_id, set by
finetuning_recipe). The chat recipe is not published: this uses the 30B-Instruct yaml's optimizer
settings at 8k context.

Sized for one node of 8 x 80 GB as configs/30b_instruct.py is (1 row of 8192 per device, 9
accumulation steps, bfloat16 gradients and first moment, the flash kernel on GPUs): `python -m
mpt_jax.plan --config=configs/30b_chat.py --devices=8 --compile` plans 72.2 GiB per device and
compiles (XLA, 8 CPU devices) to a 67.1 GiB peak (docs/sharding.md, "MPT-30B on one 8 x 80 GB node").
"""

import ml_collections

from mpt_jax.config import RELEASED_SHAPES, MPTConfig
from mpt_jax.data.formats import MPT_30B_CHAT_SYSTEM_PROMPT
from mpt_jax.run_config import base_config, finetuning_recipe, one_node_pure_bf16


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        **RELEASED_SHAPES["mpt-30b"],
        dtype="bfloat16",
        remat_policy="full",
        attn_impl="auto",  # the flash kernel on GPUs (llm-foundry: triton): no [64, 8192, 8192] scores
    ).to_config_dict()
    config.data.format = "chat"
    config.data.system_prompt = MPT_30B_CHAT_SYSTEM_PROMPT
    config = finetuning_recipe(
        config,
        init_from="ckpt/mpt-30b",
        source="files:data/chat/train.jsonl",
        lr=9.65e-6,
        global_batch_size=72,
        max_steps=4000,
        seq_len=8192,
    )
    # One node of 8 x 80 GB: 9 accumulation steps of 1 row of 8192 tokens per device.
    return one_node_pure_bf16(config, micro_batch_size=8)
