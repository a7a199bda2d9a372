"""HF ``config.json`` <-> MPTConfig, for both flavours of MPT config.

transformers' native ``MptConfig`` (``layer_norm_epsilon``, a short ``attn_config``) and
llm-foundry's / mosaicml's remote-code ``MPTConfig`` (nested ``attn_config``, ``ffn_config``,
``init_config``, ``rope_*_config``, ``norm_type``, ``norm_eps``...) both read here. Every key that
changes what the model computes is either understood or an error naming it: a reader that drops
an option silently builds another model. Keys that only say how a framework runs (``attn_impl``,
``init_device``, transformers' generation defaults...) are ignored.

``to_hf`` writes keys that llm-foundry 0.22 accepts (each ``attn_config`` key reaches its
attention class as a keyword, so a removed key such as ``prefix_lm`` would break loading) and that
transformers' ``MptConfig`` reads; the options transformers does not implement are only written
when they are on.
"""

from __future__ import annotations

import os
from typing import Any

from mpt_jax.config import ATTN_TYPES, FFN_ACT_FNS, FFN_TYPES, NORM_TYPES, MPTConfig
from mpt_jax.files import read_json

# transformers' PretrainedConfig fields (4.x and 5.x) and MPT keys that say how a framework runs,
# not what the model computes.
IGNORED_KEYS = frozenset(
    """_attn_implementation_autoset _name_or_path add_cross_attention architectures auto_map bad_words_ids
    begin_suppress_tokens bos_token_id chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id
    diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size eos_token_id
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label
    init_device initializer_range is_decoder is_encoder_decoder label2id length_penalty max_length min_length
    model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads remove_invalid_values
    repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params
    temperature tf_legacy_loss tie_encoder_decoder tokenizer_class tokenizer_name top_k top_p torch_dtype
    torchscript transformers_version typical_p use_bfloat16 use_cache use_pad_tok_in_ffn verbose
    """.split()
)
# transformers 5 writes attn_config as a sub-config carrying the generic fields too.
ATTN_IGNORED_KEYS = IGNORED_KEYS | {"attn_impl"}
FFN_IGNORED_KEYS = frozenset({"fc_type"})
INIT_IGNORED_KEYS = frozenset({"verbose"})
FC_TYPES = ("torch", "te")  # TransformerEngine's Linear is the same math
# ffn_act_fn keyword arguments that change nothing, and the defaults we implement for the others.
ACT_HARMLESS_KWARGS = frozenset({"inplace"})
ACT_DEFAULT_KWARGS = {
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "softplus": {"beta": 1.0, "threshold": 20.0},
}


def read_hf_config(source: str | os.PathLike | dict[str, Any]) -> MPTConfig:
    """An MPTConfig from a dict, a config.json file or a folder holding one (either flavour)."""
    where = "config dict"
    if not isinstance(source, dict):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        where = path
        source = read_json(path, what="HF config.json")
    try:
        return _read(dict(source))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


class _Section:
    """One (sub-)dict of config.json: values are taken by name; what is left unread is reported."""

    def __init__(self, data: Any, name: str, ignored: frozenset[str] = frozenset()):
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{name} must be an object, got {data!r}")
        self.data = dict(data or {})
        self.name = name
        self.unread = set(self.data) - ignored

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, default: Any = None) -> Any:
        self.unread.discard(key)
        value = self.data.get(key)
        return default if value is None else value

    def section(self, key: str, ignored: frozenset[str] = frozenset()) -> _Section:
        return _Section(self.get(key), self.key(key), ignored)

    def require(self, key: str, allowed: tuple, default: Any = None) -> Any:
        """A value that must be one of ``allowed`` (our implementation's limits)."""
        value = self.get(key, default)
        if value not in allowed:
            raise ValueError(f"{self.key(key)}={value!r} is not supported; expected one of {allowed}")
        return value

    def finish(self) -> None:
        if self.unread:
            keys = ", ".join(self.key(k) for k in sorted(self.unread))
            raise ValueError(f"unknown MPT config key(s) {keys}: refusing to guess what they change")


def _read(hf: dict[str, Any]) -> MPTConfig:
    if hf.get("model_type", "mpt") != "mpt":
        raise ValueError(f"model_type={hf.get('model_type')!r}, expected 'mpt'")
    top = _Section(hf, "", IGNORED_KEYS)
    for key in ("d_model", "n_heads", "n_layers", "vocab_size"):
        if key not in hf:
            raise ValueError(f"missing key {key!r}")
    d_model, n_heads = top.get("d_model"), top.get("n_heads")
    attn = top.section("attn_config", ATTN_IGNORED_KEYS)
    ffn = top.section("ffn_config", FFN_IGNORED_KEYS)
    init = top.section("init_config", INIT_IGNORED_KEYS)

    # Options we do not implement: an error unless they are off.
    if attn.get("prefix_lm", False):
        raise ValueError("attn_config.prefix_lm=True is not supported (no released MPT uses it)")
    if attn.get("nope", False):
        raise ValueError("attn_config.nope=True is not supported (llm-foundry allows it only in block_overrides)")
    kv_dim = attn.get("kv_dim")
    if kv_dim not in (None, d_model):
        raise ValueError(f"attn_config.kv_dim={kv_dim} (cross-attention inputs) is not supported")
    if attn.get("seq_parallel_world_size", 1) != 1:
        raise ValueError("attn_config.seq_parallel_world_size > 1 is not supported")
    if top.get("block_overrides"):
        raise ValueError(f"block_overrides={hf['block_overrides']!r} (per-layer attention variants) is not supported")
    head_dim = top.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        raise ValueError(f"head_dim={head_dim} != d_model / n_heads = {d_model}/{n_heads} is not supported")
    fc_type = top.get("fc_type", {"name": "torch"})
    fc_name = fc_type.get("name") if isinstance(fc_type, dict) else fc_type
    if fc_name not in FC_TYPES:
        raise ValueError(f"fc_type={fc_type!r} is not supported; expected one of {FC_TYPES}")

    attn_type = attn.require("attn_type", ATTN_TYPES, "multihead_attention")
    kv_n_heads = attn.get("kv_n_heads")
    if attn_type != "grouped_query_attention":
        kv_n_heads = None
    elif kv_n_heads is None:
        raise ValueError("attn_config.attn_type='grouped_query_attention' needs attn_config.kv_n_heads")
    dail = attn.section("rope_dail_config")
    rope_hf = attn.section("rope_hf_config")
    temperature = attn.section("attn_temperature_tuning")
    div = init.get("init_div_is_residual", True)
    fields: dict[str, Any] = dict(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=top.get("n_layers"),
        expansion_ratio=_number(top.get("expansion_ratio", 4)),
        ffn_hidden_size=ffn.get("ffn_hidden_size"),
        max_seq_len=top.get("max_seq_len", 2048),
        vocab_size=top.get("vocab_size"),
        attn_type=attn_type,
        kv_n_heads=kv_n_heads,
        alibi=attn.get("alibi", True),
        alibi_bias_max=attn.get("alibi_bias_max", 8),
        learned_pos_emb=top.get("learned_pos_emb", True),
        clip_qkv=_number(attn.get("clip_qkv")),
        qk_ln=attn.get("qk_ln", False),
        qk_gn=attn.get("qk_gn", False),
        fused_qkv=attn.get("fused_qkv", True),
        softmax_scale=_number(attn.get("softmax_scale")),
        sliding_window_size=attn.get("sliding_window_size", -1),
        attn_logit_softcapping=_number(attn.get("attn_logit_softcapping")),
        attn_uses_sequence_id=attn.get("attn_uses_sequence_id", False),
        rope=attn.get("rope", False),
        rope_theta=_number(attn.get("rope_theta", 10000.0)),
        rope_impl=attn.get("rope_impl", "dail"),
        rope_dail_type=dail.get("type", "original"),
        rope_dail_xpos_scale_base=_number(dail.get("xpos_scale_base", 512.0)),
        rope_dail_pos_idx_in_fp32=dail.get("pos_idx_in_fp32", True),
        rope_hf_type=rope_hf.get("type", "no_scaling"),
        rope_hf_factor=_number(rope_hf.get("factor", 1.0)),
        rope_hf_low_freq_factor=_number(rope_hf.get("low_freq_factor")),
        rope_hf_high_freq_factor=_number(rope_hf.get("high_freq_factor")),
        rope_hf_original_max_position_embeddings=rope_hf.get("original_max_position_embeddings"),
        attn_temperature_floor_scale=_number(temperature.get("floor_scale", 8192.0)),
        attn_temperature_attn_scale=_number(temperature.get("attn_scale", 0.0)),
        logit_scale=_number(top.get("logit_scale")),
        final_logit_softcapping=_number(top.get("final_logit_softcapping")),
        no_bias=top.get("no_bias", True),
        attention_bias=top.get("attention_bias"),
        norm_type=top.require("norm_type", NORM_TYPES, "low_precision_layernorm"),
        norm_eps=_number(top.get("norm_eps", top.get("layer_norm_epsilon", 1e-5))),
        embedding_fraction=_number(top.get("embedding_fraction", 1.0)),
        tie_word_embeddings=top.get("tie_word_embeddings", True),
        emb_pdrop=_number(top.get("emb_pdrop", 0.0)),
        attn_pdrop=_number(attn.get("attn_pdrop", 0.0)),
        resid_pdrop=_number(top.get("resid_pdrop", 0.0)),
        ffn_type=ffn.require("ffn_type", FFN_TYPES, "mptmlp"),
        ffn_act_fn=_activation_name(ffn),
        init_name=init.get("name", "kaiming_normal_"),
        init_fan_mode=init.get("fan_mode", "fan_in"),
        init_nonlinearity=init.get("init_nonlinearity", "relu"),
        init_div_is_residual=div if isinstance(div, bool) else _number(div),
        init_std=_number(init.get("init_std")),
        init_gain=_number(init.get("init_gain", 0.0)),
        emb_init_std=_number(init.get("emb_init_std")),
        emb_init_uniform_lim=_number(init.get("emb_init_uniform_lim")),
    )
    for section in (dail, rope_hf, temperature, attn, ffn, init, top):
        section.finish()
    return MPTConfig(**fields).validate()


def _number(value: Any) -> Any:
    """JSON numbers as floats (ints stay ints where exact); anything else unchanged for validate()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _activation_name(ffn: _Section) -> str:
    """ffn_config.ffn_act_fn ({"name": ..., **torch kwargs}) -> one of FFN_ACT_FNS."""
    act = ffn.get("ffn_act_fn") or {"name": "gelu", "approximate": "none"}
    if not isinstance(act, dict) or "name" not in act:
        raise ValueError(f"ffn_config.ffn_act_fn={act!r}: expected an object with a 'name'")
    name, kwargs = act["name"], {k: v for k, v in act.items() if k != "name" and k not in ACT_HARMLESS_KWARGS}
    if name == "gelu":
        approximate = kwargs.pop("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"ffn_config.ffn_act_fn.approximate={approximate!r}: expected 'none' or 'tanh'")
        name = "gelu" if approximate == "none" else "gelu_tanh"
    defaults = ACT_DEFAULT_KWARGS.get(name, {})
    for key, value in kwargs.items():
        if key not in defaults:
            raise ValueError(f"ffn_config.ffn_act_fn.{key}={value!r} is not supported for {name!r}")
        if float(value) != defaults[key]:
            raise ValueError(f"ffn_config.ffn_act_fn.{key}={value!r}: only the default {defaults[key]} is supported")
    if name not in FFN_ACT_FNS or name == "gelu_tanh" and act.get("name") != "gelu":
        raise ValueError(f"ffn_config.ffn_act_fn.name={act['name']!r} is not supported; expected one of {FFN_ACT_FNS}")
    return name


def write_hf_config(cfg: MPTConfig) -> dict[str, Any]:
    """A config.json dict that llm-foundry 0.22 and transformers load and that read_hf_config reads
    back to ``cfg`` (execution fields aside)."""
    default = MPTConfig()
    attn: dict[str, Any] = dict(
        attn_type=cfg.attn_type,
        attn_pdrop=_int_if_integral(cfg.attn_pdrop),  # transformers 5 types it as int
        attn_impl="torch",
        clip_qkv=cfg.clip_qkv,
        softmax_scale=cfg.softmax_scale,
        qk_ln=cfg.qk_ln,
        attn_uses_sequence_id=cfg.attn_uses_sequence_id,
        alibi=cfg.alibi,
        alibi_bias_max=cfg.alibi_bias_max,
    )
    if cfg.attn_type == "grouped_query_attention":
        attn["kv_n_heads"] = cfg.kv_n_heads
    for field in ("qk_gn", "fused_qkv", "sliding_window_size", "attn_logit_softcapping", "rope"):
        if getattr(cfg, field) != getattr(default, field):
            attn[field] = getattr(cfg, field)
    if cfg.rope:
        attn.update(
            rope_theta=_int_if_integral(cfg.rope_theta),
            rope_impl=cfg.rope_impl,
            rope_dail_config=dict(
                type=cfg.rope_dail_type,
                pos_idx_in_fp32=cfg.rope_dail_pos_idx_in_fp32,
                xpos_scale_base=_int_if_integral(cfg.rope_dail_xpos_scale_base),
            ),
            rope_hf_config=dict(type=cfg.rope_hf_type, factor=cfg.rope_hf_factor),
        )
        if cfg.rope_hf_type == "llama3":
            attn["rope_hf_config"].update(
                low_freq_factor=cfg.rope_hf_low_freq_factor,
                high_freq_factor=cfg.rope_hf_high_freq_factor,
                original_max_position_embeddings=cfg.rope_hf_original_max_position_embeddings,
            )
    if cfg.uses_temperature_tuning:
        attn["attn_temperature_tuning"] = dict(
            floor_scale=_int_if_integral(cfg.attn_temperature_floor_scale), attn_scale=cfg.attn_temperature_attn_scale
        )
    act: dict[str, Any] = {"name": cfg.ffn_act_fn}
    if cfg.ffn_act_fn in ("gelu", "gelu_tanh"):
        act = {"name": "gelu", "approximate": "tanh" if cfg.ffn_act_fn == "gelu_tanh" else "none"}
    ffn: dict[str, Any] = {"ffn_type": cfg.ffn_type, "ffn_act_fn": act}
    if cfg.ffn_hidden_size is not None:
        ffn["ffn_hidden_size"] = cfg.ffn_hidden_size
    out: dict[str, Any] = dict(
        architectures=["MptForCausalLM"],
        model_type="mpt",
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=_int_if_integral(cfg.expansion_ratio),  # transformers 5 types it as int
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        attn_config=attn,
        ffn_config=ffn,
        init_config=dict(
            name=cfg.init_name,
            fan_mode=cfg.init_fan_mode,
            init_nonlinearity=cfg.init_nonlinearity,
            init_div_is_residual=cfg.init_div_is_residual,
            init_std=cfg.init_std,
            init_gain=cfg.init_gain,
            emb_init_std=cfg.emb_init_std,
            emb_init_uniform_lim=cfg.emb_init_uniform_lim,
        ),
        learned_pos_emb=cfg.learned_pos_emb,
        logit_scale=cfg.logit_scale,
        no_bias=cfg.no_bias,
        norm_type=cfg.norm_type,
        norm_eps=cfg.norm_eps,
        layer_norm_epsilon=cfg.norm_eps,
        embedding_fraction=cfg.embedding_fraction,
        emb_pdrop=cfg.emb_pdrop,
        resid_pdrop=cfg.resid_pdrop,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_cache=False,
    )
    if cfg.attention_bias is not None:
        out["attention_bias"] = cfg.attention_bias
    if cfg.final_logit_softcapping is not None:
        out["final_logit_softcapping"] = cfg.final_logit_softcapping
    return out


def native_unsupported(cfg: MPTConfig) -> list[str]:
    """Options that transformers' native MptForCausalLM ignores or cannot load, with their values."""
    default = MPTConfig()
    out = []
    if cfg.attn_type != "multihead_attention":
        out.append(f"attn_type={cfg.attn_type!r}")
    if not cfg.alibi:
        out.append("alibi=False")
    if cfg.alibi_bias_max != 8:
        out.append(f"alibi_bias_max={cfg.alibi_bias_max}")
    if cfg.uses_learned_pos_emb:
        out.append("learned_pos_emb=True")
    if cfg.ffn_dim != 4 * cfg.d_model:
        out.append(f"ffn hidden size {cfg.ffn_dim} != 4 * d_model")
    if cfg.qkv_bias:
        out.append("attention biases")
    if cfg.rms_norm:
        out.append(f"norm_type={cfg.norm_type!r}")
    fields = (
        "qk_ln",
        "qk_gn",
        "fused_qkv",
        "sliding_window_size",
        "attn_logit_softcapping",
        "rope",
        "attn_temperature_attn_scale",
        "logit_scale",
        "final_logit_softcapping",
        "no_bias",
        "embedding_fraction",
        "ffn_type",
        "ffn_act_fn",
        "tie_word_embeddings",
    )
    for field in fields:
        if getattr(cfg, field) != getattr(default, field):
            out.append(f"{field}={getattr(cfg, field)!r}")
    return out


def _int_if_integral(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
