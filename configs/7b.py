"""MPT-7B, exactly the released mosaicml/mpt-7b (and -instruct, -chat) architecture.

d_model 4096, 32 heads (head_dim 128), 32 layers, max_seq_len 2048, vocabulary 50432, ALiBi,
no biases: 6,649,286,656 parameters. Training recipe: llm-foundry's mpt-7b.yaml (decoupled AdamW
lr 1.2e-4, betas (0.9, 0.95), cosine with 100 warmup steps to 0.1x, clipping 1.0, batch 1024 x 2048,
63,900 steps) on MPT-7B's pretraining data mix, below. For longer contexts raise max_seq_len (ALiBi extrapolates):
`--config.model.max_seq_len=4096`. Load the released weights with
`python -m mpt_jax.convert hf_to_jax mosaicml/mpt-7b DIR`.
"""

import ml_collections

from mpt_jax.config import RELEASED_SHAPES, MPTConfig
from mpt_jax.run_config import base_config, pretraining_recipe

# MPT-7B's pretraining data mix (model card): each row of a batch is packed from one source, the
# source drawn with these probabilities. Prepare each corpus once per split, the validation split
# (a TFDS dataset's own, or a files: source's held-out 1% of documents) into <name>-validation:
#   python -m mpt_jax.data.prepare --source=... --tokenizer=EleutherAI/gpt-neox-20b --seq_len=2048 \
#       --split=train --out=DATA_ROOT/<name>
#   python -m mpt_jax.data.prepare ... --split=validation --out=DATA_ROOT/<name>-validation
# then point DATA_ROOT at them (or override config.data.mixture). Eval reads only the validation
# folders; training never does.
DATA_ROOT = "/data/mpt-pretraining"
MPT_7B_MIX = (
    ("mc4_3.1.0_en", 0.33),
    ("c4_en_semdedup80", 0.299),
    ("redpajama_commoncrawl", 0.1),
    ("the_stack_selected_languages", 0.1),
    ("redpajama_wikipedia_en", 0.04),
    ("the_stack_markdown", 0.035),
    ("s2orc", 0.033),
    ("redpajama_books", 0.03),
    ("redpajama_arxiv", 0.019),
    ("redpajama_stackexchange", 0.014),
)


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.model = MPTConfig(
        **RELEASED_SHAPES["mpt-7b"],
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    config.data.source = ""  # the mixture below instead of a single source
    config.data.mixture = [
        {
            "source": f"tokenized:{DATA_ROOT}/{name}",
            "eval_source": f"tokenized:{DATA_ROOT}/{name}-validation",
            "format": "packed",
            "weight": weight,
        }
        for name, weight in MPT_7B_MIX
    ]
    # llm-foundry's mpt-7b.yaml recipe. The released run used LION (hyperparameters unpublished):
    # --config.optimizer.name=decoupled_lionw --config.optimizer.b2=0.99 with a lower lr.
    return pretraining_recipe(config, lr=1.2e-4, global_batch_size=1024, max_steps=63900, fsdp=True)
