"""Chat finetuning of the tiny model on the CPU: the 30b_chat path (init_from, ChatML, first-fit).

    python -m mpt_jax.train --config=configs/tiny.py --workdir=workdirs/tiny
    python -m mpt_jax.train --config=configs/tiny_chat.py --config.init_from=workdirs/tiny \\
        --config.data.source=files:chat.jsonl

init_from takes a training workdir (its newest checkpoint), an mpt-jax model checkpoint or an HF
folder. The chat file holds {"messages": [...]} lines; the tests write a small one. A few dozen
steps take well under a minute.
"""

import ml_collections

from mpt_jax.config import MPTConfig
from mpt_jax.run_config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(d_model=256, n_heads=4, n_layers=4, max_seq_len=256, vocab_size=8256).to_config_dict()
    config.init_from = "workdirs/tiny"
    config.data.source = "files:chat.jsonl"
    config.data.format = "chat"
    config.data.text_field = ml_collections.config_dict.placeholder(str)
    config.data.system_prompt = "You are a helpful assistant."
    config.data.packing = "first_fit"
    config.train.max_steps = 40
    config.train.global_batch_size = 8
    config.train.seq_len = 256
    config.train.log_every = 5
    config.train.eval_every = 0
    config.optimizer.lr = 1e-4
    config.optimizer.b2 = 0.999
    config.schedule.name = "linear_decay_with_warmup"
    config.schedule.t_warmup = 5
    config.schedule.alpha_f = 0.0
    config.checkpoint.every_steps = 20
    return config
