"""bfloat16 training: every matmul in bfloat16 (the backward's too), for GPUs as for CPUs, and the
tiny model's loss curve in bfloat16 against float32."""

from __future__ import annotations

import os
import re
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import MPTConfig, optim, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ffn_type", ["mptmlp", "mptglu"])
def test_bfloat16_train_step_lowers_for_gpu_with_only_bfloat16_matmuls(ffn_type):
    """The bfloat16 train step lowers for CUDA (from this CPU), and each of its products, forward
    and backward, attention and tied head included, multiplies bfloat16 operands into float32."""
    cfg = MPTConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=64, dtype="bfloat16", ffn_type=ffn_type
    )
    opt_cfg, sched_cfg = optim.optimizer_config(), optim.schedule_config(name="constant")
    optimizer = optim.make_optimizer(opt_cfg, sched_cfg, max_steps=10)
    schedule = optim.make_schedule(sched_cfg, lr=1e-3, max_steps=10)
    state = jax.eval_shape(lambda: steps.init_state(cfg, optimizer, jax.random.key(0)))
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    step = jax.jit(lambda s, b: steps.train_step(s, b, cfg=cfg, optimizer=optimizer, schedule=schedule))
    text = step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    # The scanned layer (once): 4 (mptglu: 5) projections x 3 products, attention 2 forward and 5
    # backward (its probabilities recomputed); the head 3.
    linears = 5 if ffn_type == "mptglu" else 4
    assert len(dots) == 3 * linears + 7 + 3, len(dots)
    for line in dots:
        operands, result = re.search(r":\s*\((.*?)\)\s*->\s*(.*)$", line).groups()
        assert operands.count("xbf16>") == 2 and "f32" not in operands, line
        assert "xf32>" in result, line


def _tiny(dtype: str, data_dir: str):
    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny.py"))["get_config"]()
    config.model.dtype = dtype
    config.data.data_dir = data_dir
    config.train.progress = False
    config.checkpoint.every_steps = 0
    return config


@pytest.mark.slow
def test_tiny_loss_curves_in_bfloat16_and_float32_end_within_two_percent(stdlib_data_dir, tmp_path):
    """configs/tiny.py's model, data, batch and schedule, once with model.dtype=bfloat16 and once in
    float32, over 120 steps instead of its 240 (its cosine spans the 120; evaluated every 40: CI
    time; the 240-step curves are in docs/performance.md): the eval losses at every eval step and
    the mean training loss of the last 20 steps agree within 2%."""
    from mpt_jax.train import Trainer

    curves = {}
    for dtype in ("float32", "bfloat16"):
        losses, evals = {}, {}

        def record(step, m, losses=losses, evals=evals):
            losses[step] = float(m["loss"])
            if "eval_loss" in m:
                evals[step] = float(m["eval_loss"])

        config = _tiny(dtype, stdlib_data_dir)
        config.train.max_steps, config.train.eval_every = 120, 40
        Trainer(config, str(tmp_path / dtype), callback=record).run()
        curves[dtype] = (losses, evals)
    (f32, f32_eval), (bf16, bf16_eval) = curves["float32"], curves["bfloat16"]
    assert sorted(f32) == sorted(bf16) and len(f32) == 120
    assert sorted(f32_eval) == sorted(bf16_eval) == [40, 80, 120]
    for step in f32_eval:
        assert abs(bf16_eval[step] - f32_eval[step]) <= 0.02 * f32_eval[step], (step, bf16_eval, f32_eval)
    tail = [s for s in sorted(f32) if s > 100]
    mean32, mean16 = np.mean([f32[s] for s in tail]), np.mean([bf16[s] for s in tail])
    print(f"eval float32 {f32_eval}, bfloat16 {bf16_eval}; last 20 steps' mean {mean32:.4f} / {mean16:.4f}")
    assert abs(mean16 - mean32) <= 0.02 * mean32, (mean16, mean32)
    assert f32[1] - f32[120] > 1.0  # it learned
