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
