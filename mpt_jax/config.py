"""MPTConfig: the hyperparameters of one MPT model, as plain frozen data.

Field names follow llm-foundry's MPTConfig with the nested ``attn_config``, ``ffn_config`` and
``init_config`` flattened (``attn_type`` not ``attn_config.attn_type``), so a config reads the same
here, in a ``--config.model.x=y`` override and in an HF ``config.json``. ``from_hf`` reads both HF
flavours (transformers' native ``MptConfig`` and mosaicml's remote-code one); ``to_hf`` writes a
config that transformers loads and that ``from_hf`` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from mpt_jax.attention import names as attention_impls
from mpt_jax.files import read_json

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
FFN_TYPES = ("mptmlp", "mptglu")
FFN_ACT_FNS = ("gelu", "gelu_tanh", "silu", "relu", "quick_gelu")
NORM_TYPES = ("low_precision_layernorm", "layernorm")
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
# Remat policy name -> the jax.checkpoint_policies attribute it means (None: no remat).
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "checkpoint_dots_with_no_batch_dims",
}
ATTN_IMPLS = attention_impls.IMPLS
# Fields that say how the model runs, not what it computes: free to change between a checkpoint
# and the run that reads it.
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat_policy", "attn_impl")
DTYPES = ("float32", "bfloat16", "float16")


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
    learned_pos_emb: bool = False  # ignored (forced off) when alibi is on, as in llm-foundry
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None  # default 1/sqrt(d_model / n_heads)
    # llm-foundry's switch for packed documents attending only to themselves: the train step passes
    # the batch's segment ids to the model only when it is on (the model applies any it is given).
    attn_uses_sequence_id: bool = False

    # Output, biases, norms, embedding.
    logit_scale: float | str | None = None  # a number or "inv_sqrt_d_model"
    no_bias: bool = True
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
        return self.learned_pos_emb and not self.alibi

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

        for field in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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
        if self.ffn_type not in FFN_TYPES:
            raise bad("ffn_type", f"unknown; expected one of {FFN_TYPES}")
        if self.ffn_act_fn not in FFN_ACT_FNS:
            raise bad("ffn_act_fn", f"unknown; expected one of {FFN_ACT_FNS}")
        if self.norm_type not in NORM_TYPES:
            raise bad("norm_type", f"unknown; expected one of {NORM_TYPES}")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be positive")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise bad("clip_qkv", "must be positive or None")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise bad("softmax_scale", "must be positive or None")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise bad("logit_scale", "must be a number, None or 'inv_sqrt_d_model'")
        if self.alibi_bias_max <= 0:
            raise bad("alibi_bias_max", "must be positive")
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise bad("embedding_fraction", "must be in (0, 1]")
        for field in ("emb_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise bad(field, "must be in [0, 1)")
        if self.init_name not in INIT_NAMES:
            raise bad("init_name", f"unknown; expected one of {INIT_NAMES}")
        if self.init_fan_mode not in ("fan_in", "fan_out"):
            raise bad("init_fan_mode", "must be 'fan_in' or 'fan_out'")
        if self.init_nonlinearity not in NONLINEARITIES:
            raise bad("init_nonlinearity", f"unknown; expected one of {NONLINEARITIES}")
        if self.init_name == "baseline_" and self.init_std is None:
            raise bad("init_std", "init_name='baseline_' needs init_std")
        if self.init_name.startswith("xavier") and self.init_gain == 0:
            raise bad("init_gain", f"init_name={self.init_name!r} with gain 0 gives all-zero weights")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"unknown; expected one of {DTYPES}")
        if self.param_dtype not in DTYPES:
            raise bad("param_dtype", f"unknown; expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise bad("remat_policy", f"unknown; expected one of {tuple(REMAT_POLICIES)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise bad("attn_impl", f"unknown; expected one of {ATTN_IMPLS}")
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
    # HuggingFace config.json, both flavours.

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> MPTConfig:
        """Reads an HF MPT config: a dict, a config.json file or a folder holding one.

        Understands transformers' native format (``layer_norm_epsilon``, a nested ``attn_config``
        with fewer keys) and mosaicml's remote-code / llm-foundry format (nested ``attn_config``,
        ``ffn_config``, ``init_config``, ``norm_type``, ``norm_eps``).
        """
        where = "config dict"
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            source = read_json(path, what="HF config.json")
        hf = dict(source)
        if hf.get("model_type", "mpt") != "mpt":
            raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected 'mpt'")
        attn = dict(hf.get("attn_config") or {})
        ffn = dict(hf.get("ffn_config") or {})
        init = dict(hf.get("init_config") or {})

        for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
            if key not in hf:
                raise ValueError(f"{where}: missing key {key!r}")
        if attn.get("prefix_lm"):
            raise ValueError(f"{where}: attn_config.prefix_lm=True is not supported")
        if attn.get("rope"):
            raise ValueError(f"{where}: attn_config.rope=True is not supported (MPT uses ALiBi)")
        if ffn.get("ffn_type", "mptmlp") not in FFN_TYPES:
            raise ValueError(
                f"{where}: ffn_config.ffn_type={ffn.get('ffn_type')!r} is not supported; expected one of {FFN_TYPES}"
            )
        act = ffn.get("ffn_act_fn") or {"name": "gelu", "approximate": "none"}
        act_name = act.get("name", "gelu")
        if act_name == "gelu" and act.get("approximate", "none") == "tanh":
            act_name = "gelu_tanh"

        eps = hf.get("norm_eps", hf.get("layer_norm_epsilon", 1e-5))
        div = init.get("init_div_is_residual", True)
        fields: dict[str, Any] = dict(
            d_model=hf["d_model"],
            n_heads=hf["n_heads"],
            n_layers=hf["n_layers"],
            expansion_ratio=float(hf.get("expansion_ratio", 4)),
            ffn_hidden_size=ffn.get("ffn_hidden_size"),
            max_seq_len=hf.get("max_seq_len", 2048),
            vocab_size=hf["vocab_size"],
            attn_type=attn.get("attn_type", "multihead_attention"),
            kv_n_heads=attn.get("kv_n_heads") if attn.get("attn_type") == "grouped_query_attention" else None,
            alibi=bool(attn.get("alibi", True)),
            alibi_bias_max=attn.get("alibi_bias_max", 8),
            learned_pos_emb=bool(hf.get("learned_pos_emb", True)),
            clip_qkv=attn.get("clip_qkv"),
            qk_ln=bool(attn.get("qk_ln", False)),
            softmax_scale=attn.get("softmax_scale"),
            attn_uses_sequence_id=bool(attn.get("attn_uses_sequence_id", False)),
            logit_scale=hf.get("logit_scale"),
            no_bias=bool(hf.get("no_bias", True)),
            norm_type=hf.get("norm_type", "low_precision_layernorm"),
            norm_eps=float(eps),
            embedding_fraction=float(hf.get("embedding_fraction", 1.0)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            emb_pdrop=float(hf.get("emb_pdrop", 0.0)),
            attn_pdrop=float(attn.get("attn_pdrop", 0.0)),
            resid_pdrop=float(hf.get("resid_pdrop", 0.0)),
            ffn_type=ffn.get("ffn_type", "mptmlp"),
            ffn_act_fn=act_name,
            init_name=init.get("name", "kaiming_normal_"),
            init_fan_mode=init.get("fan_mode", "fan_in"),
            init_nonlinearity=init.get("init_nonlinearity", "relu"),
            init_div_is_residual=div if isinstance(div, bool) else float(div),
            init_std=init.get("init_std"),
            init_gain=float(init.get("init_gain", 0.0)),
            emb_init_std=init.get("emb_init_std"),
            emb_init_uniform_lim=init.get("emb_init_uniform_lim"),
        )
        if fields["attn_type"] == "grouped_query_attention" and fields["kv_n_heads"] is None:
            raise ValueError(f"{where}: attn_config.attn_type='grouped_query_attention' needs attn_config.kv_n_heads")
        if fields["norm_type"] not in NORM_TYPES:
            raise ValueError(
                f"{where}: norm_type={fields['norm_type']!r} is not supported; expected one of {NORM_TYPES}"
            )
        try:
            return cls(**fields).validate()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict: loads in transformers' MptConfig and reads back through from_hf.

        It carries the llm-foundry fields too (ffn_config, init_config, norm_eps, kv_n_heads); note
        that transformers' own MptForCausalLM implements only the released-model options (see
        ``hf_native_unsupported``).
        """
        attn_config: dict[str, Any] = dict(
            attn_type=self.attn_type,
            attn_pdrop=_int_if_integral(self.attn_pdrop),  # transformers 5 types it as int
            attn_impl="torch",
            clip_qkv=self.clip_qkv,
            softmax_scale=self.softmax_scale,
            prefix_lm=False,
            qk_ln=self.qk_ln,
            attn_uses_sequence_id=self.attn_uses_sequence_id,
            alibi=self.alibi,
            alibi_bias_max=self.alibi_bias_max,
        )
        if self.attn_type == "grouped_query_attention":
            attn_config["kv_n_heads"] = self.kv_n_heads
        act: dict[str, Any] = {"name": self.ffn_act_fn}
        if self.ffn_act_fn in ("gelu", "gelu_tanh"):
            act = {"name": "gelu", "approximate": "tanh" if self.ffn_act_fn == "gelu_tanh" else "none"}
        ffn_config: dict[str, Any] = {"ffn_type": self.ffn_type, "ffn_act_fn": act}
        if self.ffn_hidden_size is not None:
            ffn_config["ffn_hidden_size"] = self.ffn_hidden_size
        return dict(
            architectures=["MptForCausalLM"],
            model_type="mpt",
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            expansion_ratio=_int_if_integral(self.expansion_ratio),  # transformers 5 types it as int
            max_seq_len=self.max_seq_len,
            vocab_size=self.vocab_size,
            attn_config=attn_config,
            ffn_config=ffn_config,
            init_config=dict(
                name=self.init_name,
                fan_mode=self.init_fan_mode,
                init_nonlinearity=self.init_nonlinearity,
                init_div_is_residual=self.init_div_is_residual,
                init_std=self.init_std,
                init_gain=self.init_gain,
                emb_init_std=self.emb_init_std,
                emb_init_uniform_lim=self.emb_init_uniform_lim,
            ),
            learned_pos_emb=self.learned_pos_emb,
            logit_scale=self.logit_scale,
            no_bias=self.no_bias,
            norm_type=self.norm_type,
            norm_eps=self.norm_eps,
            layer_norm_epsilon=self.norm_eps,
            embedding_fraction=self.embedding_fraction,
            emb_pdrop=self.emb_pdrop,
            resid_pdrop=self.resid_pdrop,
            tie_word_embeddings=self.tie_word_embeddings,
            use_cache=False,
        )

    def hf_native_unsupported(self) -> list[str]:
        """Options that transformers' native MptForCausalLM ignores or cannot load, with values."""
        default = MPTConfig()
        out = []
        if self.attn_type != "multihead_attention":
            out.append(f"attn_type={self.attn_type!r}")
        if not self.alibi:
            out.append("alibi=False")
        if self.alibi_bias_max != 8:
            out.append(f"alibi_bias_max={self.alibi_bias_max}")
        if self.uses_learned_pos_emb:
            out.append("learned_pos_emb=True")
        if self.qk_ln:
            out.append("qk_ln=True")
        if self.ffn_dim != 4 * self.d_model:
            out.append(f"ffn hidden size {self.ffn_dim} != 4 * d_model")
        for field in ("logit_scale", "no_bias", "embedding_fraction", "ffn_type", "ffn_act_fn", "tie_word_embeddings"):
            if getattr(self, field) != getattr(default, field):
                out.append(f"{field}={getattr(self, field)!r}")
        return out


def _int_if_integral(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
