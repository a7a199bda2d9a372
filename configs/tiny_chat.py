"""Chat finetuning of the tiny model on the CPU: the 30b_chat path (init_from, ChatML, first-fit).

    python -m mpt_jax.train --config=configs/tiny.py
    python -m mpt_jax.train --config=configs/tiny_chat.py

init_from takes a training workdir (its newest checkpoint; default workdirs/tiny, what the first
command writes), an mpt-jax model checkpoint or an HF folder. The data is the embedded chat corpus
`stdlib-chat`: about 6k conversations about the Python standard library, built offline from its
docstrings ("What does `json.dumps` do?" -> the docstring's first paragraph, "Show me its
signature." -> the signature), with a validation split of modules that neither pretraining nor
finetuning sees. Your own data: `--config.data.source=chat.jsonl` ({"messages": [...]} lines; eval
then uses its held-out 1%, or set --config.data.eval_source=FILE).

Measured (2 CPU cores shared with other work), from a tiny model pretrained for only 40 steps
(`--config.train.max_steps=40`): 40 steps of 8 x 256 tokens (about 32 conversations per step) in
about 1.5 minutes, 2 s/step; training loss 8.18 at step 1, 5.09 at step 40; eval loss 5.76 at
step 20 and 5.55 at step 40 (lr 1e-4 instead: 6.67).
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
        vocab_size=8256,
        attn_uses_sequence_id=True,  # packed conversations attend only within themselves
    ).to_config_dict()
    config.init_from = "workdirs/tiny"
    config.data.source = "stdlib-chat"
    config.data.format = "chat"
    config.data.system_prompt = "You are a helpful assistant."
    config.data.packing = "first_fit"
    config.train.max_steps = 40
    config.train.global_batch_size = 8
    config.train.seq_len = 256
    config.train.log_every = 5
    config.train.eval_every = 20
    config.train.eval_batches = 4
    config.optimizer.lr = 1e-3
    config.optimizer.b2 = 0.999
    config.schedule.name = "linear_decay_with_warmup"
    config.schedule.t_warmup = 5
    config.schedule.alpha_f = 0.0
    config.checkpoint.every_steps = 20
    return config
