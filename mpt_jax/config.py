"""MPTConfig: the hyperparameters of one MPT model, as plain frozen data.

Field names follow llm-foundry's MPTConfig with the nested ``attn_config``, ``ffn_config`` and
``init_config`` flattened (``attn_type`` not ``attn_config.attn_type``), so a config reads the same
here, in a ``--config.model.x=y`` override and in an HF ``config.json`` (read and written by
``hf_config.py``). Every llm-foundry 0.22 option that changes the math has a field here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from mpt_jax.attention import names as attention_impls

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
FFN_TYPES = ("mptmlp", "mptglu")
# llm-foundry takes any torch.nn.functional activation (plus quick_gelu); these are the ones we
# implement, by their torch names ("gelu_tanh" is torch's gelu with approximate="tanh").
FFN_ACT_FNS = (
    "gelu",
    "gelu_tanh",
    "silu",
    "relu",
    "quick_gelu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "softplus",
    "elu",
    "selu",
    "mish",
    "relu6",
)
# LayerNorm (mean-subtracting, bias unless no_bias) and RMSNorm (no mean, never a bias). The
# low-precision and triton variants are the same math in another kernel/precision.
LAYER_NORMS = ("low_precision_layernorm", "layernorm")
RMS_NORMS = ("rmsnorm", "low_precision_rmsnorm", "triton_rmsnorm")
NORM_TYPES = LAYER_NORMS + RMS_NORMS
# llm-foundry builds the attention's q_ln/k_ln without handing them norm_type or norm_eps: they
# are LayerNorms with eps 1e-5 whatever the model's norms are.
QK_NORM_EPS = 1e-5
ROPE_IMPLS = ("dail", "hf")
ROPE_DAIL_TYPES = ("original", "xpos")
ROPE_HF_TYPES = ("no_scaling", "linear", "dynamic", "llama3")
INIT_NAMES = (
    "kaiming_normal_",
    "kaiming_uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "baseline_",
    "small_init_",
    "neox_init_",
)
NONLINEARITIES = ("relu", "leaky_relu", "linear", "tanh", "sigmoid", "selu")
# Remat policy name -> what the backward keeps of each layer (model.remat_policy builds the jax
# policy from the names the model tags): nothing saved but the layer input ("full"), the linear
# layers' outputs ("dots_no_batch"), those and the attention's output and log-sum-exp ("dots").
REMAT_POLICIES = {
    "none": "no remat: every residual jax needs",
    "full": "the layer input",
    "dots": "the layer input, the linear layers' outputs, the attention output and log-sum-exp",
    "dots_no_batch": "the layer input and the linear layers' outputs",
}
ATTN_IMPLS = attention_impls.IMPLS
# Fields that say how the model runs, not what it computes: free to change between a checkpoint
# and the run that reads it.
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat_policy", "attn_impl")
DTYPES = ("float32", "bfloat16", "float16")
# train.grad_dtype: the gradients and their sum over micro-batches (steps.train_step).
GRAD_DTYPES = ("float32", "bfloat16")
# The released models' shapes (their config.json), for configs/: the other fields are the defaults.
RELEASED_SHAPES = {
    "mpt-7b": dict(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048, vocab_size=50432),
    "mpt-30b": dict(d_model=7168, n_heads=64, n_layers=48, max_seq_len=8192, vocab_size=50432),
}


@dataclasses.dataclass(frozen=True)
class MPTConfig:
    """Hyperparameters of an MPT model. Defaults are those of the released MPT-7B."""

    # Shape.
    d_model: int = 4096
    n_heads: int = 32
    n_layers: int = 32
    expansion_ratio: float = 4.0
    ffn_hidden_size: int | None = None  # overrides expansion_ratio when set
    max_seq_len: int = 2048
    vocab_size: int = 50432

    # Attention.
    attn_type: str = "multihead_attention"
    kv_n_heads: int | None = None  # grouped_query_attention only
    alibi: bool = True
    alibi_bias_max: int = 8
    learned_pos_emb: bool = False  # ignored (forced off) when alibi or rope is on, as in llm-foundry
    clip_qkv: float | None = None
    qk_ln: bool = False  # one norm over all heads' q (and k) features
    qk_gn: bool = False  # one norm per head over head_dim, weights shared by the heads
    fused_qkv: bool = True  # one Wqkv matmul; False: separate Wq, Wk, Wv weights
    softmax_scale: float | None = None  # default 1/sqrt(d_model / n_heads)
    sliding_window_size: int = -1  # -1: off; else query i sees keys j with |i - j| <= window
    attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c), before ALiBi
    # llm-foundry's switch for packed documents attending only to themselves: the train step passes
    # the batch's segment ids to the model only when it is on (the model applies any it is given).
    attn_uses_sequence_id: bool = False
    # Rotary position embedding (not in the released MPTs): llm-foundry's rope_dail_config and
    # rope_hf_config, flattened.
    rope: bool = False
    rope_theta: float = 10000.0
    rope_impl: str = "dail"  # "dail" (flash-attn's rotary) or "hf" (transformers' Llama rotary)
    rope_dail_type: str = "original"  # or "xpos"
    rope_dail_xpos_scale_base: float = 512.0
    rope_dail_pos_idx_in_fp32: bool = True  # positions are float32 here either way
    rope_hf_type: str = "no_scaling"  # or "linear", "dynamic", "llama3"
    rope_hf_factor: float = 1.0
    rope_hf_low_freq_factor: float | None = None  # llama3 only
    rope_hf_high_freq_factor: float | None = None  # llama3 only
    rope_hf_original_max_position_embeddings: int | None = None  # llama3 only
    # Llama-4 attention temperature: q *= attn_scale * log(floor((pos + 1) / floor_scale) + 1) + 1
    # with pos the position within the document; attn_scale 0 is off.
    attn_temperature_floor_scale: float = 8192.0
    attn_temperature_attn_scale: float = 0.0

    # Output, biases, norms, embedding.
    logit_scale: float | str | None = None  # a number or "inv_sqrt_d_model"
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c), after logit_scale
    no_bias: bool = True  # no bias in out_proj, the FFN and LayerNorms
    attention_bias: bool | None = None  # bias in Wqkv (Wq/Wk/Wv); None: not no_bias
    norm_type: str = "low_precision_layernorm"
    norm_eps: float = 1e-5
    embedding_fraction: float = 1.0
    tie_word_embeddings: bool = True

    # Dropout.
    emb_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0

    # Feed-forward.
    ffn_type: str = "mptmlp"
    ffn_act_fn: str = "gelu"  # exact (erf) GELU, as in MPT; JAX's default gelu is the tanh one

    # Initialisation (llm-foundry init_config, flattened).
    init_name: str = "kaiming_normal_"
    init_fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    init_div_is_residual: bool | float = True
    init_std: float | None = None
    init_gain: float = 0.0
    emb_init_std: float | None = None
    emb_init_uniform_lim: float | None = None

    # Execution (not part of the math).
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attn_impl: str = "xla"

    # ----------------------------------------------------------------------------------------
    # Derived quantities.

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        if self.attn_type == "multihead_attention":
            return self.n_heads
        if self.attn_type == "multiquery_attention":
            return 1
        return self.kv_n_heads if self.kv_n_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden_size is not None:
            return int(self.ffn_hidden_size)
        return int(self.d_model * self.expansion_ratio)

    @property
    def uses_learned_pos_emb(self) -> bool:
        return self.learned_pos_emb and not self.alibi and not self.rope

    @property
    def uses_positions(self) -> bool:
        """Whether the model reads positions within each document (learned positions, temperature)."""
        return self.uses_learned_pos_emb or self.uses_temperature_tuning

    @property
    def qkv_bias(self) -> bool:
        return (not self.no_bias) if self.attention_bias is None else bool(self.attention_bias)

    @property
    def rms_norm(self) -> bool:
        return self.norm_type in RMS_NORMS

    @property
    def norm_bias(self) -> bool:
        """The block norms carry a bias unless no_bias or RMSNorm (torch.nn.RMSNorm has none)."""
        return not self.no_bias and not self.rms_norm

    @property
    def uses_temperature_tuning(self) -> bool:
        return self.attn_temperature_attn_scale != 0.0

    @property
    def attn_scale(self) -> float:
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(self.d_model / self.n_heads)

    @property
    def logit_multiplier(self) -> float | None:
        if self.logit_scale is None:
            return None
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return float(self.logit_scale)

    # ----------------------------------------------------------------------------------------
    # Checks.

    def validate(self) -> MPTConfig:
        """Raises ValueError naming the field and value of the first inconsistency; returns self."""

        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"MPTConfig.{field}={getattr(self, field)!r}: {why}")

        for field in dataclasses.fields(self):
            problem = _type_problem(field.type, getattr(self, field.name))
            if problem:
                raise bad(field.name, problem)
        for field in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            if getattr(self, field) < 1:
                raise bad(field, "must be a positive integer")
        if self.d_model % self.n_heads:
            raise bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if self.attn_type not in ATTN_TYPES:
            raise bad("attn_type", f"unknown; expected one of {ATTN_TYPES}")
        if self.attn_type == "grouped_query_attention":
            if self.kv_n_heads is None or self.kv_n_heads < 1:
                raise bad("kv_n_heads", "grouped_query_attention needs a positive kv_n_heads")
            if self.n_heads % self.kv_n_heads:
                raise bad("kv_n_heads", f"n_heads={self.n_heads} must be divisible by kv_n_heads")
        if self.ffn_hidden_size is None:
            hidden = self.d_model * self.expansion_ratio
            if self.expansion_ratio <= 0 or hidden != int(hidden):
                raise bad("expansion_ratio", f"d_model * expansion_ratio = {hidden} is not a positive integer")
        elif self.ffn_hidden_size < 1:
            raise bad("ffn_hidden_size", "must be a positive integer")
        choices = {
            "ffn_type": FFN_TYPES,
            "ffn_act_fn": FFN_ACT_FNS,
            "norm_type": NORM_TYPES,
            "rope_impl": ROPE_IMPLS,
            "rope_dail_type": ROPE_DAIL_TYPES,
            "rope_hf_type": ROPE_HF_TYPES,
            "init_name": INIT_NAMES,
            "init_fan_mode": ("fan_in", "fan_out"),
            "init_nonlinearity": NONLINEARITIES,
            "dtype": DTYPES,
            "param_dtype": DTYPES,
            "remat_policy": tuple(REMAT_POLICIES),
            "attn_impl": ATTN_IMPLS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise bad(field, f"unknown; expected one of {allowed}")
        positive = ("norm_eps", "alibi_bias_max", "rope_theta", "rope_hf_factor", "rope_dail_xpos_scale_base")
        for field in positive:
            if getattr(self, field) <= 0:
                raise bad(field, "must be positive")
        for field in ("clip_qkv", "softmax_scale", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, field) is not None and getattr(self, field) <= 0:
                raise bad(field, "must be positive or None")
        if self.sliding_window_size < -1:
            raise bad("sliding_window_size", "must be -1 (off) or a window >= 0")
        if self.qk_ln and self.qk_gn:
            raise bad("qk_gn", "qk_ln and qk_gn are exclusive (llm-foundry allows one of them)")
        if self.rope and self.rope_impl == "hf" and self.rope_hf_type == "llama3":
            for field in (
                "rope_hf_low_freq_factor",
                "rope_hf_high_freq_factor",
                "rope_hf_original_max_position_embeddings",
            ):
                if getattr(self, field) is None:
                    raise bad(field, "rope_hf_type='llama3' needs it")
            if self.rope_hf_high_freq_factor <= self.rope_hf_low_freq_factor:
                raise bad(
                    "rope_hf_high_freq_factor", f"must exceed rope_hf_low_freq_factor={self.rope_hf_low_freq_factor}"
                )
        if self.rope and self.head_dim % 2:
            raise bad("rope", f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.uses_temperature_tuning and self.attn_temperature_floor_scale <= 0:
            raise bad("attn_temperature_floor_scale", "must be positive")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise bad("logit_scale", "must be a number, None or 'inv_sqrt_d_model'")
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise bad("embedding_fraction", "must be in (0, 1]")
        for field in ("emb_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise bad(field, "must be in [0, 1)")
        if self.init_name == "baseline_" and self.init_std is None:
            raise bad("init_std", "init_name='baseline_' needs init_std")
        if self.init_name.startswith("xavier") and self.init_gain == 0:
            raise bad("init_gain", f"init_name={self.init_name!r} with gain 0 gives all-zero weights")
        return self

    # ----------------------------------------------------------------------------------------
    # Plain-data views.

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MPTConfig:
        """Builds a config from a flat dict of field values; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown MPTConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data).validate()

    def replace(self, **changes: Any) -> MPTConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_config_dict(self):
        """The config as an ml_collections ConfigDict (the `model` section of a run config)."""
        import ml_collections

        return ml_collections.ConfigDict(self.to_dict(), type_safe=False)

    # ----------------------------------------------------------------------------------------
    # HuggingFace config.json, both flavours (mpt_jax/hf_config.py).

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> MPTConfig:
        """Reads an HF MPT config (transformers' or llm-foundry's flavour): a dict, a config.json
        file or a folder holding one. Unknown keys that could change the math are errors."""
        from mpt_jax.hf_config import read_hf_config

        return read_hf_config(source)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that llm-foundry and transformers load and ``from_hf`` reads back."""
        from mpt_jax.hf_config import write_hf_config

        return write_hf_config(self)

    def hf_native_unsupported(self) -> list[str]:
        """Options that transformers' native MptForCausalLM ignores or cannot load, with values."""
        from mpt_jax.hf_config import native_unsupported

        return native_unsupported(self)


def _type_problem(annotation: str, value: Any) -> str | None:
    """Why ``value`` does not fit a field annotated ``annotation`` (e.g. "float | None"), or None.

    Integers are accepted where floats are; booleans only where bool is named.
    """
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        return None if "None" in kinds else "must not be None"
    if isinstance(value, bool):
        return None if "bool" in kinds else f"must be {' or '.join(kinds)}, not a bool"
    if isinstance(value, int) and ("int" in kinds or "float" in kinds):
        return None
    if isinstance(value, float) and "float" in kinds:
        return None
    if isinstance(value, str) and "str" in kinds:
        return None
    return f"must be {' or '.join(kinds)}, got {type(value).__name__}"
