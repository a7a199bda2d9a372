"""MPT-30B-Chat: finetune MPT-30B on multi-turn ChatML conversations.

    python -m mpt_jax.convert hf_to_jax mosaicml/mpt-30b ckpt/mpt-30b
    python -m mpt_jax.train --config=configs/30b_chat.py --config.data.source=files:/data/chat/train.jsonl

Data: jsonl {"messages": [{"role", "content"}, ...]} rendered as ChatML
(<|im_start|>role\\ncontent<|im_end|>\\n), loss on assistant turns only; <|im_start|> and <|im_end|>
are added to the gpt-neox-20b tokenizer (ids 50277 and 50278, inside MPT's 50432 embedding rows);
MPT-30B-Chat's default system prompt is added where a conversation has none. The chat recipe is not
published: this uses the 30B-Instruct yaml's optimizer settings at 8k context.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.data.formats import MPT_30B_CHAT_SYSTEM_PROMPT
from mpt_jax.run_config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192, vocab_size=50432, dtype="bfloat16", remat_policy="full"
    ).to_config_dict()
    config.init_from = "ckpt/mpt-30b"
    config.data.source = "files:data/chat/train.jsonl"
    config.data.format = "chat"
    config.data.text_field = ml_collections.config_dict.placeholder(str)
    config.data.system_prompt = MPT_30B_CHAT_SYSTEM_PROMPT
    config.data.tokenizer = "EleutherAI/gpt-neox-20b"
    config.data.packing = "first_fit"
    config.train.max_steps = 4000
    config.train.global_batch_size = 72
    config.train.seq_len = 8192
    config.train.eval_every = 0
    config.optimizer.lr = 9.65e-6
    config.schedule.name = "linear_decay_with_warmup"
    config.schedule.t_warmup = 50
    config.schedule.alpha_f = 0.0
    config.checkpoint.every_steps = 500
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
