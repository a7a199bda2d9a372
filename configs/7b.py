"""MPT-7B, exactly the released mosaicml/mpt-7b (and -instruct, -chat) architecture.

d_model 4096, 32 heads (head_dim 128), 32 layers, max_seq_len 2048, vocabulary 50432, ALiBi,
no biases: 6,649,286,656 parameters. For longer contexts raise max_seq_len (ALiBi extrapolates):
`--config.model.max_seq_len=4096`. Load the released weights with
`python -m mpt_jax.convert hf_to_jax mosaicml/mpt-7b DIR`.
"""

import ml_collections

from mpt_jax.config import MPTConfig

# MPT-7B's pretraining data mix (model card): each row of a batch is packed from one source, the
# source drawn with these probabilities. Prepare each corpus once with
#   python -m mpt_jax.data.prepare --source=... --tokenizer=EleutherAI/gpt-neox-20b --seq_len=2048 --out=DATA_ROOT/<name>
# then point DATA_ROOT at them (or override config.data.mixture).
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
    config = ml_collections.ConfigDict()
    config.model = MPTConfig(
        d_model=4096,
        n_heads=32,
        n_layers=32,
        max_seq_len=2048,
        vocab_size=50432,
        dtype="bfloat16",
        remat_policy="full",
    ).to_config_dict()
    config.data = ml_collections.ConfigDict()
    config.data.tokenizer = "EleutherAI/gpt-neox-20b"
    config.data.mixture = [
        {"source": f"tokenized:{DATA_ROOT}/{name}", "format": "packed", "weight": weight} for name, weight in MPT_7B_MIX
    ]
    return config
