"""Logits parity with llm-foundry 0.22's own MPT, every option, both ways (run by hand).

llm-foundry pins torch 2.7 and transformers 4.51, so it lives in its own venv:

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install llm-foundry==0.22.0
    python tests/llmfoundry_parity.py --lf_python=/tmp/lf/bin/python [--cases=qk_gn,rope_hf_llama3] [--out=DIR]

For every case the script (1) has llm-foundry build a random ``MPTForCausalLM`` (every weight,
norms included, random) with ``attn_impl='torch'`` on CPU, save it with ``save_pretrained`` and
compute its logits on fixed tokens; (2) loads that folder with ``mpt_jax.hf.load_hf`` and compares
our logits (llm-foundry -> mpt-jax); (3) draws new random params for the same config on our side,
writes them with ``mpt_jax.hf.save_hf`` and has llm-foundry load that folder *as written* and
compute their logits, compared with ours (mpt-jax -> llm-foundry). It
prints max |delta logits| both ways per case and exits non-zero if any exceeds ``--tol``
(default 1e-4). This file runs in both interpreters: ``--side=lf`` is the llm-foundry half.

Not covered here because llm-foundry cannot run them on a CPU (they have float64 reference tests
in tests/test_model_options.py): ``rope_impl='dail'`` (needs flash-attn) and
``attn_temperature_tuning`` (llm-foundry's torch attention raises without flash's position ids).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

BASE = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=96, expansion_ratio=2, no_bias=True)
ALIBI = {"alibi": True}

# name: (config overrides, attn_config overrides, ffn_config overrides, use packed sequence ids)
CASES: dict[str, tuple[dict, dict, dict, bool]] = {
    "alibi_no_bias (released MPTs)": ({}, ALIBI, {}, False),
    "learned_pos_emb": (dict(learned_pos_emb=True), {}, {}, False),
    "biases": (dict(no_bias=False), ALIBI, {}, False),
    "attention_bias_only": (dict(no_bias=True, attention_bias=True), ALIBI, {}, False),
    "no_attention_bias": (dict(no_bias=False, attention_bias=False), ALIBI, {}, False),
    "layernorm": (dict(norm_type="layernorm", no_bias=False), ALIBI, {}, False),
    "rmsnorm": (dict(norm_type="rmsnorm", no_bias=False), ALIBI, {}, False),
    "low_precision_rmsnorm_eps1e-3": (dict(norm_type="low_precision_rmsnorm", norm_eps=1e-3), ALIBI, {}, False),
    "qk_ln_eps1e-3": (dict(norm_eps=1e-3), dict(ALIBI, qk_ln=True), {}, False),
    "qk_ln_biases": (dict(no_bias=False), dict(ALIBI, qk_ln=True), {}, False),
    "qk_gn": (dict(norm_eps=1e-3, no_bias=False), dict(ALIBI, qk_gn=True), {}, False),
    "qk_ln_rmsnorm": (dict(norm_type="rmsnorm"), dict(ALIBI, qk_ln=True), {}, False),
    "qk_gn_rmsnorm_biases": (
        dict(norm_type="rmsnorm", no_bias=False, norm_eps=1e-2),
        dict(ALIBI, qk_gn=True),
        {},
        False,
    ),
    "clip_qkv_softmax_scale": ({}, dict(ALIBI, clip_qkv=0.3, softmax_scale=0.2), {}, False),
    "alibi_bias_max_4_6heads": (dict(n_heads=6, d_model=48), dict(ALIBI, alibi_bias_max=4), {}, False),
    "mqa": ({}, dict(ALIBI, attn_type="multiquery_attention"), {}, False),
    "gqa": ({}, dict(ALIBI, attn_type="grouped_query_attention", kv_n_heads=2), {}, False),
    "unfused_qkv_mha": (dict(no_bias=False), dict(ALIBI, fused_qkv=False, clip_qkv=0.5), {}, False),
    "unfused_qkv_gqa_qk_ln": (
        {},
        dict(ALIBI, fused_qkv=False, qk_ln=True, attn_type="grouped_query_attention", kv_n_heads=2),
        {},
        False,
    ),
    "sliding_window_3": ({}, dict(ALIBI, sliding_window_size=3), {}, False),
    "sliding_window_0_learned_pos": (dict(learned_pos_emb=True), dict(sliding_window_size=0), {}, False),
    "attn_logit_softcapping": ({}, dict(ALIBI, attn_logit_softcapping=0.5), {}, False),
    "final_logit_softcapping": (dict(final_logit_softcapping=2.0), ALIBI, {}, False),
    "softcaps_and_window_gqa": (
        dict(final_logit_softcapping=3.0),
        dict(
            ALIBI, attn_logit_softcapping=1.0, sliding_window_size=5, attn_type="grouped_query_attention", kv_n_heads=2
        ),
        {},
        False,
    ),
    "rope_hf_no_scaling": ({}, dict(rope=True, rope_impl="hf", rope_theta=500), {}, False),
    "rope_hf_linear": (
        {},
        dict(rope=True, rope_impl="hf", rope_hf_config={"type": "linear", "factor": 2.0}),
        {},
        False,
    ),
    "rope_hf_dynamic": (
        {},
        dict(rope=True, rope_impl="hf", rope_hf_config={"type": "dynamic", "factor": 4.0}),
        {},
        False,
    ),
    "rope_hf_llama3": (
        {},
        dict(
            rope=True,
            rope_impl="hf",
            rope_theta=10000,
            rope_hf_config={
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        {},
        False,
    ),
    "rope_hf_qk_gn_gqa": (
        {},
        dict(rope=True, rope_impl="hf", qk_gn=True, attn_type="grouped_query_attention", kv_n_heads=2),
        {},
        False,
    ),
    "rope_and_alibi": ({}, dict(ALIBI, rope=True, rope_impl="hf"), {}, False),
    "gelu_tanh": ({}, ALIBI, {"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}, False),
    "silu": ({}, ALIBI, {"ffn_act_fn": {"name": "silu"}}, False),
    "relu": ({}, ALIBI, {"ffn_act_fn": {"name": "relu"}}, False),
    "quick_gelu": ({}, ALIBI, {"ffn_act_fn": {"name": "quick_gelu"}}, False),
    "mish": ({}, ALIBI, {"ffn_act_fn": {"name": "mish"}}, False),
    "mptglu_silu_ffn_hidden_size": (
        {},
        ALIBI,
        {"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 40},
        False,
    ),
    "logit_scale_untied": (dict(logit_scale=0.5, tie_word_embeddings=False), ALIBI, {}, False),
    "logit_scale_inv_sqrt_d_model": (dict(logit_scale="inv_sqrt_d_model"), ALIBI, {}, False),
    "embedding_fraction": (dict(embedding_fraction=0.3), ALIBI, {}, False),
    "sequence_id_packed": ({}, dict(ALIBI, attn_uses_sequence_id=True), {}, True),
}


def _tokens(cfg: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed tokens [2, max_seq_len] and packed sequence ids (three documents per row)."""
    rng = np.random.default_rng(seed)
    length = cfg["max_seq_len"]
    tokens = rng.integers(0, cfg["vocab_size"], (2, length))
    seq = np.stack([np.repeat([0, 1, 2], [5, 7, length - 12]), np.repeat([0, 1], [9, length - 9])])
    return tokens, seq


def _full_config(name: str) -> dict:
    top, attn, ffn, _ = CASES[name]
    cfg = dict(BASE, **top)
    cfg["attn_config"] = dict(attn_impl="torch", **attn)
    if ffn:
        cfg["ffn_config"] = ffn
    return cfg


# ------------------------------------------------------------------------------------------------
# The llm-foundry half (its venv: torch 2.7, transformers 4.51, llm-foundry 0.22).


def _lf_logits(model, tokens, seq, use_seq):
    import torch

    with torch.no_grad():
        kwargs = {"sequence_id": torch.as_tensor(seq)} if use_seq else {}
        return model(input_ids=torch.as_tensor(tokens), **kwargs).logits.float().numpy()


def lf_build(names: list[str], out: str) -> None:
    import torch
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    for k, name in enumerate(names):
        cfg = _full_config(name)
        torch.manual_seed(k)
        model = MPTForCausalLM(MPTConfig(init_device="cpu", **cfg)).eval()
        with torch.no_grad():  # every weight random, so that no mapping error can hide
            for pname, p in model.named_parameters():
                if "norm" in pname or "_ln" in pname:
                    p.copy_(
                        (1.0 + 0.3 * torch.randn_like(p)) if pname.endswith("weight") else 0.2 * torch.randn_like(p)
                    )
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        folder = os.path.join(out, f"case{k}")
        model.save_pretrained(os.path.join(folder, "lf"), safe_serialization=True)
        tokens, seq = _tokens(cfg)
        np.save(os.path.join(folder, "lf_logits.npy"), _lf_logits(model, tokens, seq, CASES[name][3]))


def lf_reload(names: list[str], out: str) -> None:
    from llmfoundry.models.mpt import MPTForCausalLM

    for k, name in enumerate(names):
        folder = os.path.join(out, f"case{k}")
        if not os.path.isdir(os.path.join(folder, "ours")):
            continue
        try:
            model = MPTForCausalLM.from_pretrained(os.path.join(folder, "ours")).eval()
            tokens, seq = _tokens(_full_config(name))
            np.save(os.path.join(folder, "lf_reload_logits.npy"), _lf_logits(model, tokens, seq, CASES[name][3]))
        except Exception as e:  # noqa: BLE001 - reported per case
            with open(os.path.join(folder, "lf_reload_error.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------
# The mpt-jax half.


def ours(names: list[str], out: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from mpt_jax import MPT
    from mpt_jax.hf import load_hf, save_hf

    rows = []
    for k, name in enumerate(names):
        folder = os.path.join(out, f"case{k}")
        row = {"case": name}
        try:
            cfg, params = load_hf(os.path.join(folder, "lf"), dtype="float32")
            tokens, seq = _tokens(_full_config(name))
            segment_ids = jnp.asarray(seq + 1) if CASES[name][3] else None
            apply = jax.jit(lambda p, t, s, cfg=cfg: MPT(cfg).apply({"params": p}, t, segment_ids=s))

            def forward(p, tokens, segment_ids, apply=apply):
                return np.asarray(apply(p, jnp.asarray(tokens), segment_ids))

            logits = forward(params, tokens, segment_ids)
            row["lf_to_jax"] = float(np.abs(logits - np.load(os.path.join(folder, "lf_logits.npy"))).max())
            row["max_logit"] = float(np.abs(logits).max())
            # The export direction on params that never came from llm-foundry.
            rng = np.random.default_rng(k + 1000)
            fresh = jax.tree.map(lambda a, r=rng: (a + 0.1 * r.standard_normal(a.shape)).astype(np.float32), params)
            np.save(os.path.join(folder, "jax_logits.npy"), np.asarray(forward(fresh, tokens, segment_ids)))
            save_hf(cfg, fresh, os.path.join(folder, "ours"))
        except Exception as e:  # noqa: BLE001 - reported per case
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("main", "lf_build", "lf_reload"), default="main")
    parser.add_argument("--lf_python", default="/tmp/lf/bin/python", help="python of the llm-foundry venv")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--out", default="", help="working folder (default: a temporary one)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if args.side == "lf_build":
        lf_build(names, args.out)
        return 0
    if args.side == "lf_reload":
        lf_reload(names, args.out)
        return 0

    out = args.out or tempfile.mkdtemp(prefix="lf_parity_")
    os.makedirs(out, exist_ok=True)
    here = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def lf(side: str) -> None:
        cmd = [args.lf_python, here, f"--side={side}", f"--cases={','.join(names)}", f"--out={out}"]
        subprocess.run(cmd, check=True, env=env, cwd=out)

    lf("lf_build")
    rows = ours(names, out)
    lf("lf_reload")
    worst = 0.0
    print(f"{'case':<40s} {'llm-foundry -> mpt-jax':>24s} {'mpt-jax -> llm-foundry':>24s} {'max |logit|':>12s}")
    for k, row in enumerate(rows):
        folder = os.path.join(out, f"case{k}")
        reload = os.path.join(folder, "lf_reload_logits.npy")
        if os.path.isfile(reload):
            row["jax_to_lf"] = float(np.abs(np.load(reload) - np.load(os.path.join(folder, "jax_logits.npy"))).max())
        elif os.path.isfile(os.path.join(folder, "lf_reload_error.txt")):
            row["error"] = (
                "llm-foundry could not load our export: " + open(os.path.join(folder, "lf_reload_error.txt")).read()
            )
        a, b = row.get("lf_to_jax", float("nan")), row.get("jax_to_lf", float("nan"))
        worst = max(worst, a if a == a else float("inf"), b if b == b else float("inf"))
        print(f"{row['case']:<40s} {a:>24.2e} {b:>24.2e} {row.get('max_logit', float('nan')):>12.2f}")
        if "error" in row:
            print(f"    error: {row['error']}")
    print(f"worst: {worst:.2e} (tolerance {args.tol:g}); folders in {out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
