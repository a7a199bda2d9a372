"""steps.loss_and_grads against plain autodiff of the mean loss: the embeddings looked up outside
the differentiated function and scattered back, and the gradients scaled through the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import MPTConfig, steps
from mpt_jax.model import init_params


@pytest.mark.parametrize(
    "options",
    [dict(), dict(tie_word_embeddings=False), dict(alibi=False, learned_pos_emb=True, embedding_fraction=0.5)],
    ids=["tied", "untied", "learned-pos-fraction"],
)
def test_loss_and_grads_is_autodiff_of_the_mean_loss(options):
    cfg = MPTConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=16, vocab_size=64, **options)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (3, 16)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 16)) < 0.7, jnp.int32)
    batch = {
        "tokens": tokens,
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(16), tokens.shape),
        "loss_mask": mask,
    }
    count = float(jnp.sum(mask[:, 1:]))

    def mean_loss(p):
        return steps.loss_fn(p, batch, cfg, train=True)[0] / count

    want = jax.grad(mean_loss)(params)
    (loss_sum, n), got = steps.loss_and_grads(params, batch, cfg, jax.random.key(1), 1.0 / count)
    assert float(n) == count
    np.testing.assert_allclose(float(loss_sum) / count, float(mean_loss(params)), rtol=1e-6)
    flat_want, flat_got = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)
    assert [k for k, _ in flat_want] == [k for k, _ in flat_got]
    for (path, a), (_, b) in zip(flat_want, flat_got, strict=True):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))
    # The table's gradient has both the head's product and the lookup's rows (tied) or only rows.
    assert float(jnp.max(jnp.abs(got["wte"]["embedding"]))) > 0


def test_float32_cpu_steps_compile_with_the_memory_optimized_scheduler():
    """``train_compiler_options``: XLA:CPU's memory-optimized scheduler for float32 steps on CPU
    (and nothing for bfloat16 or other platforms); with it the compiled step of a small model
    holds fewer temporaries than with XLA's default order, and computes the same update."""
    from mpt_jax import optim

    f32 = MPTConfig(d_model=256, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=8256)
    bf16 = MPTConfig(d_model=256, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=8256, dtype="bfloat16")
    assert steps.train_compiler_options(f32, "cpu") == steps.CPU_FLOAT32_TRAIN_OPTIONS
    assert steps.train_compiler_options(bf16, "cpu") is None and steps.train_compiler_options(f32, "gpu") is None

    optimizer = optim.make_optimizer(optim.optimizer_config(), optim.schedule_config(name="constant"), max_steps=10)
    schedule = optim.make_schedule(optim.schedule_config(name="constant"), lr=1e-3, max_steps=10)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8256, (8, 128)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
    batch["positions"] = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), tokens.shape)
    step = jax.jit(
        lambda s, b: steps.train_step(s, b, cfg=f32, optimizer=optimizer, schedule=schedule), donate_argnums=(0,)
    )
    lowered = step.lower(jax.eval_shape(lambda: steps.init_state(f32, optimizer, jax.random.key(0))), batch)
    default = lowered.compile()
    ordered = lowered.compile(compiler_options=steps.train_compiler_options(f32, "cpu"))
    temps = [c.memory_analysis().temp_size_in_bytes for c in (default, ordered)]
    assert temps[1] < temps[0], temps  # 125m: 1.93 -> 1.78 GiB; here 147 -> 145 MB
    (a, ma), (b, mb) = (c(steps.init_state(f32, optimizer, jax.random.key(0)), batch) for c in (default, ordered))
    assert float(ma["loss"]) == float(mb["loss"])
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
