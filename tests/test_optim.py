"""mpt_jax.optim against plain float64 transcriptions of Composer / llm-foundry's update rules.

The references below are written from the rules (Composer's and llm-foundry's code), not from optim.py: DecoupledAdamW,
torch AdamW, DecoupledLionW, Composer's schedulers and torch's clip_grad_norm_.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpt_jax import optim

T_WARMUP, MAX_STEPS, N_STEPS = 3, 8, 10  # 10 steps: warm-up, cosine decay, then past max_steps
LR, WD = 1e-2, 0.1

# Tolerance of the float32 run against float64, in absolute terms on params of size < 1.1:
# each step rounds p + u to float32 (at most half an ulp, 2^-24 = 6e-8 for |p| in [1, 2)) and
# computes an update of size <= ~3 * lr with a few float32 roundings (~1e-6 relative, 3e-8).
# Ten steps therefore stay below 10 * 1e-7 = 1e-6 (measured: 0.9e-7 to 1.9e-7). A wrong rule (decay
# scaled by lr or not, the Adam paper's eps-hat, a schedule off by one step, no clipping) moves params
# by about 1e-2 here; the tests check that each such variant is more than 100 * TOL away.
TOL = 1e-6


# ----------------------------------------------------------------------------- float64 references


def ref_multiplier(name: str, t: int, t_warmup: int, alpha_f: float, max_steps: int) -> float:
    """Composer's schedulers (CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler, ...)."""
    if name == "constant":
        return 1.0
    if t < t_warmup:
        return t / t_warmup
    if name == "constant_with_warmup":
        return 1.0
    frac = min(1.0, (t - t_warmup) / (max_steps - t_warmup)) if max_steps > t_warmup else 0.0
    if name == "cosine_with_warmup":
        return alpha_f + (1 - alpha_f) * (1.0 + math.cos(math.pi * frac)) / 2.0
    assert name == "linear_decay_with_warmup"
    return 1.0 + frac * (alpha_f - 1.0)


def ref_clip(grads: list[np.ndarray], max_norm: float | None) -> list[np.ndarray]:
    """torch.nn.utils.clip_grad_norm_: grads *= clamp(max_norm / (total_norm + 1e-6), max=1)."""
    if not max_norm:
        return grads
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    coef = min(max_norm / (total + 1e-6), 1.0)
    return [g * coef for g in grads]


def ref_adam(params, grad_steps, mask, *, lr, b1, b2, eps, wd, mults, clip, coupled=False, eps_hat=False):
    """Composer DecoupledAdamW (coupled=False) or torch AdamW (coupled=True), in float64.

    eps_hat=True is the Adam paper's "efficient" form (eps added to sqrt(v) before the bias
    correction), used only to show that the test can tell the two apart.
    """
    p = [np.array(x, np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for step, grads in enumerate(grad_steps):
        t = step + 1
        lr_t = lr * mults[step]
        grads = ref_clip([np.array(g, np.float64) for g in grads], clip)
        for i, g in enumerate(grads):
            if wd != 0 and mask[i]:
                p[i] = p[i] * (1 - (lr_t if coupled else lr_t / lr) * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if eps_hat:
                p[i] = p[i] - lr_t * math.sqrt(1 - b2**t) / (1 - b1**t) * m[i] / (np.sqrt(v[i]) + eps)
            else:
                denom = np.sqrt(v[i]) / math.sqrt(1 - b2**t) + eps
                p[i] = p[i] - lr_t / (1 - b1**t) * m[i] / denom
    return p


def ref_lion(params, grad_steps, mask, *, lr, b1, b2, wd, mults, clip):
    """llm-foundry DecoupledLionW in float64."""
    p = [np.array(x, np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    for step, grads in enumerate(grad_steps):
        lr_t = lr * mults[step]
        grads = ref_clip([np.array(g, np.float64) for g in grads], clip)
        for i, g in enumerate(grads):
            if wd != 0 and mask[i]:
                p[i] = p[i] * (1 - lr_t / lr * wd)
            p[i] = p[i] - lr_t * np.sign(b1 * m[i] + (1 - b1) * g)
            m[i] = b2 * m[i] + (1 - b2) * g
    return p


# ----------------------------------------------------------------------------- fixtures and helpers


def make_params(seed: int = 0) -> dict:
    """A small tree with a kernel, a norm scale, an embedding and a bias (the mask's cases)."""
    rng = np.random.default_rng(seed)

    def u(*shape):
        return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)

    return {
        "blocks": {"attn": {"Wqkv": {"kernel": u(4, 6)}}, "norm_1": {"scale": u(6)}},
        "wte": {"embedding": u(10, 4)},
        "lm_head": {"bias": u(3), "kernel": u(4, 3)},
    }


def make_grad_steps(params: dict, n: int, seed: int = 1) -> list[list[np.ndarray]]:
    """Random grads per step, with leaves of very different scales (so eps matters for some),
    a global norm above the clip threshold on some steps and below on others, and exact zeros
    in the first step (Lion's sign(0) = 0)."""
    rng = np.random.default_rng(seed)
    leaves = jax.tree.leaves(params)
    scales = [10.0 ** rng.uniform(-4, 0) for _ in leaves]
    steps = []
    for step in range(n):
        step_scale = 10.0 ** rng.uniform(-1, 1)
        grads = [rng.normal(size=x.shape) * s * step_scale for x, s in zip(leaves, scales, strict=True)]
        if step == 0:
            grads[0].flat[::3] = 0.0
        steps.append([g.astype(np.float32) for g in grads])
    return steps


def run_optimizer(tx, params, grad_steps, *, jit: bool = False):
    treedef = jax.tree.structure(params)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for grads in grad_steps:
        updates, state = update(jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def max_diff(params, ref) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(jax.tree.leaves(params), ref, strict=True)
    )


SCHEDULE = {"name": "cosine_with_warmup", "t_warmup": T_WARMUP, "alpha_f": 0.1}


def mults_of(schedule: dict, n: int = N_STEPS) -> list[float]:
    return [ref_multiplier(schedule["name"], t, schedule["t_warmup"], schedule["alpha_f"], MAX_STEPS) for t in range(n)]


# ----------------------------------------------------------------------------- update rules


@pytest.mark.parametrize("name", ["decoupled_adamw", "adamw"])
@pytest.mark.parametrize("decay_all", [True, False])
def test_adam_matches_float64_reference(name, decay_all):
    params = make_params()
    grad_steps = make_grad_steps(params, N_STEPS)
    opt = optim.optimizer_config(
        name=name, lr=LR, b2=0.999, eps=1e-4, weight_decay=WD, decay_norms_and_embeddings=decay_all
    )
    out, state = run_optimizer(optim.make_optimizer(opt, SCHEDULE, max_steps=MAX_STEPS), params, grad_steps)

    # Leaves in key order: Wqkv kernel, norm_1 scale, lm_head bias, lm_head kernel, wte embedding.
    assert jax.tree.leaves(optim.default_decay_mask(params)) == [True, False, False, True, False]
    mask = jax.tree.leaves(optim.default_decay_mask(params)) if not decay_all else [True] * 5
    kwargs = dict(lr=LR, b1=0.9, b2=0.999, eps=1e-4, wd=WD, mults=mults_of(SCHEDULE), clip=1.0)
    ref = ref_adam(jax.tree.leaves(params), grad_steps, mask, coupled=name == "adamw", **kwargs)
    diff = max_diff(out, ref)
    print(f"{name} decay_all={decay_all}: max |float32 - float64| = {diff:.3g}")
    assert diff <= TOL
    assert int(state[1].count) == N_STEPS

    # Sensitivity: the rules this port must not fall into are far outside the tolerance.
    eps_hat = ref_adam(jax.tree.leaves(params), grad_steps, mask, coupled=name == "adamw", eps_hat=True, **kwargs)
    other_decay = ref_adam(jax.tree.leaves(params), grad_steps, mask, coupled=name != "adamw", **kwargs)
    shifted = dict(kwargs, mults=mults_of(SCHEDULE, N_STEPS + 1)[1:])
    off_by_one = ref_adam(jax.tree.leaves(params), grad_steps, mask, coupled=name == "adamw", **shifted)
    unclipped = ref_adam(jax.tree.leaves(params), grad_steps, mask, coupled=name == "adamw", **dict(kwargs, clip=None))
    for wrong in (eps_hat, other_decay, off_by_one, unclipped):
        assert max_diff(out, wrong) > 100 * TOL


@pytest.mark.parametrize("decay_all", [True, False])
def test_lion_matches_float64_reference(decay_all):
    params = make_params()
    grad_steps = make_grad_steps(params, N_STEPS)
    opt = optim.optimizer_config(
        name="decoupled_lionw", lr=LR, b2=0.99, weight_decay=WD, decay_norms_and_embeddings=decay_all
    )
    out, _ = run_optimizer(optim.make_optimizer(opt, SCHEDULE, max_steps=MAX_STEPS), params, grad_steps)

    mask = jax.tree.leaves(optim.default_decay_mask(params)) if not decay_all else [True] * 5
    kwargs = dict(lr=LR, b1=0.9, b2=0.99, wd=WD, mults=mults_of(SCHEDULE), clip=1.0)
    ref = ref_lion(jax.tree.leaves(params), grad_steps, mask, **kwargs)
    diff = max_diff(out, ref)
    print(f"decoupled_lionw decay_all={decay_all}: max |float32 - float64| = {diff:.3g}")
    assert diff <= TOL
    coupled = ref_lion(jax.tree.leaves(params), grad_steps, mask, **dict(kwargs, wd=WD * LR))
    assert max_diff(out, coupled) > 100 * TOL


def test_lion_sign_of_zero_is_zero():
    params = {"w": jnp.ones((4,))}
    tx = optim.make_optimizer({"name": "decoupled_lionw", "lr": 0.1}, {"name": "constant"}, max_steps=10)
    updates, _ = tx.update({"w": jnp.array([0.0, 1.0, -2.0, 0.0])}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], np.array([0.0, -0.1, 0.1, 0.0], np.float32))


def test_decoupled_adamw_without_decay_is_optax_adam():
    """With no decay and a constant lr, Composer's Adam is optax.adam: torch's eps placement
    (sqrt(v) / sqrt(1 - b2^t) + eps) and optax's (sqrt(v_hat) + eps) are the same formula."""
    params = make_params()
    grad_steps = make_grad_steps(params, N_STEPS)
    opt = {"name": "decoupled_adamw", "lr": LR, "b2": 0.999, "eps": 1e-4, "grad_clip_norm": None}
    ours, _ = run_optimizer(optim.make_optimizer(opt, {"name": "constant"}, max_steps=MAX_STEPS), params, grad_steps)
    theirs, _ = run_optimizer(optax.adam(LR, b1=0.9, b2=0.999, eps=1e-4), params, grad_steps)
    assert max_diff(ours, [np.asarray(x, np.float64) for x in jax.tree.leaves(theirs)]) <= TOL
    # And "adamw" is optax.adamw (lr-coupled decay) on the same schedule.
    opt = dict(opt, name="adamw", weight_decay=WD)
    ours, _ = run_optimizer(optim.make_optimizer(opt, SCHEDULE, max_steps=MAX_STEPS), params, grad_steps)
    sched = optim.make_schedule(SCHEDULE, lr=LR, max_steps=MAX_STEPS)
    theirs, _ = run_optimizer(optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-4, weight_decay=WD), params, grad_steps)
    assert max_diff(ours, [np.asarray(x, np.float64) for x in jax.tree.leaves(theirs)]) <= TOL


def test_first_step_has_lr_zero_but_updates_moments():
    params = make_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.make_optimizer({"weight_decay": WD}, SCHEDULE, max_steps=MAX_STEPS)
    updates, state = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
    assert all(float(jnp.min(m)) > 0 for m in jax.tree.leaves(state[1].mu))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", optim.SCHEDULES)
@pytest.mark.parametrize("t_warmup,max_steps", [(10, 100), (0, 50), (20, 20)])
def test_schedule_values(name, t_warmup, max_steps):
    alpha_f = 0.1
    schedule = {"name": name, "t_warmup": t_warmup, "alpha_f": alpha_f}
    fn = optim.make_schedule(schedule, lr=3e-4, max_steps=max_steps)
    steps = sorted({0, 1, t_warmup // 2, max(t_warmup - 1, 0), t_warmup, t_warmup + 1, (t_warmup + max_steps) // 2,
                    max_steps - 1, max_steps, max_steps + 7, 3 * max_steps})  # fmt: skip
    for t in steps:
        want = 3e-4 * ref_multiplier(name, t, t_warmup if name != "constant" else 0, alpha_f, max_steps)
        got = float(fn(t))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (name, t)
    # Jittable, on an int32 step counter as optax's states hold.
    got = jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(got, [float(fn(t)) for t in steps], rtol=1e-6)


def test_schedule_landmarks():
    cos = optim.make_schedule({"name": "cosine_with_warmup", "t_warmup": 100, "alpha_f": 0.1}, lr=1.0, max_steps=1100)
    assert float(cos(0)) == 0.0
    assert float(cos(50)) == pytest.approx(0.5)
    assert float(cos(100)) == pytest.approx(1.0)
    assert float(cos(600)) == pytest.approx(
        0.55
    )  # half way through the decay span (t_max - t_warmup, as Composer's code)
    assert float(cos(1100)) == pytest.approx(0.1)
    assert float(cos(5000)) == pytest.approx(0.1)
    lin = optim.make_schedule({"name": "linear_decay_with_warmup", "t_warmup": 50}, lr=1.0, max_steps=150)
    assert [float(lin(t)) for t in (25, 50, 100, 150, 200)] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0.0])
    const = optim.make_schedule({"name": "constant_with_warmup", "t_warmup": 4, "alpha_f": 0.5}, lr=2.0, max_steps=8)
    assert [float(const(t)) for t in (0, 2, 4, 100)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    flat = optim.make_schedule(optim.schedule_config(name="constant"), lr=2.0, max_steps=8)
    assert float(flat(0)) == 2.0


# ----------------------------------------------------------------------------- clipping and masks


def test_clipping_equals_rescaled_gradient():
    params = make_params()
    rng = np.random.default_rng(3)
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    g = jax.tree.map(lambda x: x * (10.0 / optim.global_norm(g)), g)
    assert float(optim.global_norm(g)) == pytest.approx(10.0, rel=1e-6)
    # torch's coefficient is 1 / (10 + 1e-6), 1e-7 away from 1/10: equal to float32 rounding.
    unit = jax.tree.map(lambda x: x / 10.0, g)
    for name in ("decoupled_adamw", "decoupled_lionw"):
        opt = {"name": name, "lr": 1e-3, "eps": 1e-6, "weight_decay": WD}
        clipped_tx = optim.make_optimizer(dict(opt, grad_clip_norm=1.0), {"name": "constant"}, max_steps=10)
        plain_tx = optim.make_optimizer(dict(opt, grad_clip_norm=0), {"name": "constant"}, max_steps=10)
        clipped, _ = run_optimizer(clipped_tx, params, [jax.tree.leaves(g)] * 3)
        plain, _ = run_optimizer(plain_tx, params, [jax.tree.leaves(unit)] * 3)
        assert max_diff(clipped, [np.asarray(x, np.float64) for x in jax.tree.leaves(plain)]) <= 1e-7
    # Below the threshold the gradient is untouched (torch multiplies by exactly 1).
    small = jax.tree.map(lambda x: x / 20.0, g)
    out, _ = optim.clip_by_global_norm(1.0).update(small, optax.EmptyState())
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(small), strict=True))
    out, _ = optim.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert float(optim.global_norm(out)) == pytest.approx(10.0 / (10.0 + 1e-6), rel=1e-6)


def test_clipping_off_keeps_state_structure():
    params = make_params()
    on = optim.make_optimizer({"grad_clip_norm": 1.0}, SCHEDULE, max_steps=MAX_STEPS).init(params)
    off = optim.make_optimizer({"grad_clip_norm": None}, SCHEDULE, max_steps=MAX_STEPS).init(params)
    assert jax.tree.structure(on) == jax.tree.structure(off)


@pytest.mark.parametrize("name", ["decoupled_adamw", "decoupled_lionw", "adamw"])
def test_decay_mask(name):
    params = make_params()
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, jnp.float32), params)
    one_step = {"name": "constant"}
    no_decay = optim.make_optimizer({"name": name, "weight_decay": 0.0}, one_step, max_steps=5)
    base, _ = no_decay.update(grads, no_decay.init(params), params)
    masks = {
        "tree": optim.default_decay_mask(params),
        "callable": optim.default_decay_mask,
        "prefix": {"blocks": {"attn": True, "norm_1": False}, "wte": False, "lm_head": {"bias": False, "kernel": True}},
    }
    for how, mask in masks.items():
        tx = optim.make_optimizer({"name": name, "weight_decay": 0.5}, one_step, max_steps=5, decay_mask=mask)
        upd, _ = tx.update(grads, tx.init(params), params)
        flat_mask = jax.tree.leaves(optim.default_decay_mask(params))
        for decayed, u, b, p in zip(flat_mask, *(jax.tree.leaves(t) for t in (upd, base, params)), strict=True):
            if decayed:  # the update gains exactly -c * wd * p, c = 1 (decoupled) or lr (torch AdamW)
                c = 6e-4 if name == "adamw" else 1.0
                np.testing.assert_allclose(u - b, -c * 0.5 * p, rtol=1e-5, atol=1e-9, err_msg=how)
            else:
                np.testing.assert_array_equal(u, b, err_msg=how)
    # No mask and decay_norms_and_embeddings=True (the default): everything decays, as in Composer.
    tx = optim.make_optimizer({"name": name, "weight_decay": 0.5}, one_step, max_steps=5)
    upd, _ = tx.update(grads, tx.init(params), params)
    assert all(not np.array_equal(u, b) for u, b in zip(jax.tree.leaves(upd), jax.tree.leaves(base), strict=True))


def test_default_decay_mask_on_mpt_params():
    from flax import linen as nn

    from mpt_jax import MPT, MPTConfig

    cfg = MPTConfig(
        d_model=32, n_heads=2, n_layers=2, max_seq_len=16, vocab_size=64, no_bias=False, learned_pos_emb=True,
        alibi=False, qk_ln=True, tie_word_embeddings=False,
    )  # fmt: skip
    shapes = jax.eval_shape(lambda: MPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    for params in (shapes, nn.unbox(shapes)):  # boxed (LogicallyPartitioned) as init returns them, and plain
        mask = optim.default_decay_mask(params)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
        decayed = sorted(k for k, v in flat.items() if v)
        assert decayed and all("kernel" in k for k in decayed), decayed
        assert any("lm_head" in k for k in decayed)
        assert not any(v for k, v in flat.items() if any(s in k for s in ("norm", "_ln", "bias", "wte", "wpe")))


# ----------------------------------------------------------------------------- dtypes, jit, state


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_bfloat16_params_float32_moments(name):
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), make_params())
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.bfloat16), params)
    tx = optim.make_optimizer({"name": name, "weight_decay": 0.1}, SCHEDULE, max_steps=MAX_STEPS)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
    core = state[1]
    moments = [core.mu] + ([core.nu] if hasattr(core, "nu") else [])
    assert all(leaf.dtype == jnp.float32 for m in moments for leaf in jax.tree.leaves(m))
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert optax.apply_updates(params, updates)["wte"]["embedding"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_bfloat16_first_moment(name):
    """mu_dtype='bfloat16' stores the first moment rounded to bfloat16 (Adam's second moment stays
    float32); each step computes it in float32 from the stored value and updates with the float32
    value, so the first update is exactly float32's and later ones stay close."""
    params = make_params()
    grad_steps = make_grad_steps(params, 6)
    treedef = jax.tree.structure(params)
    grads = [jax.tree.unflatten(treedef, [jnp.asarray(g) for g in step]) for step in grad_steps]
    opt = {"name": name, "lr": LR, "weight_decay": WD, "b2": 0.99, "grad_clip_norm": None}
    txs = {dt: optim.make_optimizer(dict(opt, mu_dtype=dt), SCHEDULE, max_steps=MAX_STEPS) for dt in optim.MU_DTYPES}
    states = {dt: tx.init(params) for dt, tx in txs.items()}
    core = states["bfloat16"][1]
    assert {x.dtype for x in jax.tree.leaves(core.mu)} == {jnp.dtype(jnp.bfloat16)}
    if hasattr(core, "nu"):
        assert {x.dtype for x in jax.tree.leaves(core.nu)} == {jnp.dtype(jnp.float32)}
    ps = {dt: params for dt in txs}
    for step, g in enumerate(grads):
        before = states["bfloat16"][1].mu
        updates = {}
        for dt, tx in txs.items():
            updates[dt], states[dt] = tx.update(g, states[dt], ps[dt])
            ps[dt] = optax.apply_updates(ps[dt], updates[dt])
        if step == 0:  # from zero moments the float32 update is the same bits
            for a, b in zip(jax.tree.leaves(updates["bfloat16"]), jax.tree.leaves(updates["float32"]), strict=True):
                assert np.array_equal(np.asarray(a), np.asarray(b))
        # The stored moment is the float32 moment of the stored one, rounded once.
        beta = opt["b2"] if name == "decoupled_lionw" else optim.optimizer_config().b1
        after = jax.tree.leaves(states["bfloat16"][1].mu)
        for m0, gi, m1 in zip(jax.tree.leaves(before), jax.tree.leaves(g), after, strict=True):
            m0 = m0.astype(jnp.float32)
            if name == "decoupled_lionw":  # torch.lerp with weight 1 - b2 < 0.5
                want = m0 + (1.0 - beta) * (gi - m0)
            else:
                want = beta * m0 + (1.0 - beta) * gi
            assert np.array_equal(np.asarray(want.astype(jnp.bfloat16)), np.asarray(m1))
    if name != "decoupled_lionw":  # Lion's sign may flip where b1 m + (1 - b1) g is near 0
        assert 0 < max_diff(ps["bfloat16"], [np.asarray(x, np.float64) for x in jax.tree.leaves(ps["float32"])]) < 2e-3


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_jit_matches_eager_and_state_is_arrays(name):
    params = make_params()
    grad_steps = make_grad_steps(params, 4)
    opt = {"name": name, "lr": LR, "weight_decay": WD, "decay_norms_and_embeddings": False}
    tx = optim.make_optimizer(opt, SCHEDULE, max_steps=MAX_STEPS)
    eager, eager_state = run_optimizer(tx, params, grad_steps)
    jitted, jit_state = run_optimizer(tx, params, grad_steps, jit=True)
    assert max_diff(jitted, [np.asarray(x, np.float64) for x in jax.tree.leaves(eager)]) <= 1e-7
    assert jax.tree.structure(eager_state) == jax.tree.structure(jit_state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(jit_state))
    assert jit_state[1].count.dtype == jnp.int32 and int(jit_state[1].count) == 4


def test_state_checkpoint_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    params = make_params()
    tx = optim.make_optimizer({"weight_decay": WD}, SCHEDULE, max_steps=MAX_STEPS)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    restored = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
    a, b = tx.update(grads, state, params)[0], tx.update(grads, restored, params)[0]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ----------------------------------------------------------------------------- config and errors


def test_config_helpers():
    opt = optim.optimizer_config()
    assert opt.to_dict() == {
        "name": "decoupled_adamw", "lr": 6e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
        "grad_clip_norm": 1.0, "decay_norms_and_embeddings": True, "mu_dtype": "float32",
    }  # fmt: skip
    assert optim.optimizer_config(lr=1e-4, name="decoupled_lionw").lr == 1e-4
    assert optim.schedule_config().to_dict() == {"name": "cosine_with_warmup", "t_warmup": 100, "alpha_f": 0.1}
    assert optim.schedule_config(t_warmup=50).t_warmup == 50
    # ConfigDicts go straight in; keys irrelevant to a choice (Lion's eps) are accepted.
    tx = optim.make_optimizer(optim.optimizer_config(name="decoupled_lionw"), optim.schedule_config(), max_steps=200)
    tx.init(make_params())
    with pytest.raises(ValueError, match="momentum"):
        optim.optimizer_config(momentum=0.9)
    with pytest.raises(ValueError, match="warmup"):
        optim.schedule_config(warmup=3)


@pytest.mark.parametrize(
    "optimizer,schedule,match",
    [
        ({"name": "sgd"}, SCHEDULE, r"unknown optimizer name config\.optimizer\.name='sgd'"),
        ({"name": "adamw", "beta1": 0.9}, SCHEDULE, r"unknown config\.optimizer key\(s\) \['beta1'\]"),
        ({}, {"name": "cosine"}, r"unknown schedule name config\.schedule\.name='cosine'"),
        ({}, dict(SCHEDULE, t_max=5), r"unknown config\.schedule key\(s\) \['t_max'\]"),
        ({}, {"name": "cosine_with_warmup"}, r"needs config\.schedule\.t_warmup"),
        ({}, dict(SCHEDULE, t_warmup=MAX_STEPS + 1), r"config\.schedule\.t_warmup=\d+ is greater than max_steps"),
        ({}, dict(SCHEDULE, t_warmup=-1), r"config\.schedule\.t_warmup"),
        ({}, dict(SCHEDULE, t_warmup=2.5), r"config\.schedule\.t_warmup"),
        ({}, dict(SCHEDULE, alpha_f="x"), r"config\.schedule\.alpha_f"),
        ({"b2": 1.0}, SCHEDULE, r"config\.optimizer\.b2"),
        ({"lr": -1.0}, SCHEDULE, r"config\.optimizer\.lr"),
        ({"lr": "1e-3"}, SCHEDULE, r"config\.optimizer\.lr"),
        ({"weight_decay": -0.1}, SCHEDULE, r"config\.optimizer\.weight_decay"),
        ({"grad_clip_norm": -1.0}, SCHEDULE, r"config\.optimizer\.grad_clip_norm"),
        ({"decay_norms_and_embeddings": "no"}, SCHEDULE, r"config\.optimizer\.decay_norms_and_embeddings"),
        ({"mu_dtype": "float16"}, SCHEDULE, r"config\.optimizer\.mu_dtype='float16'"),
    ],
)
def test_errors(optimizer, schedule, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(optimizer, schedule, max_steps=MAX_STEPS)


def test_schedule_errors_and_params_required():
    with pytest.raises(ValueError, match="unknown schedule name"):
        optim.make_schedule({"name": "step"}, lr=1.0, max_steps=10)
    with pytest.raises(ValueError, match=r"\['alpha_i'\]"):
        optim.make_schedule(dict(SCHEDULE, alpha_i=1.0), lr=1.0, max_steps=10)
    tx = optim.make_optimizer({"weight_decay": 0.1}, SCHEDULE, max_steps=MAX_STEPS)
    params = make_params()
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    # Without weight decay, params are optional (optax convention).
    tx = optim.make_optimizer({}, SCHEDULE, max_steps=MAX_STEPS)
    updates, _ = tx.update(params, tx.init(params))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
