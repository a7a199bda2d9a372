"""Optimizers and learning-rate schedules with the exact semantics of Composer / llm-foundry.

llm-foundry trains MPT with Composer's ``DecoupledAdamW`` (or its own ``DecoupledLionW``), a
Composer scheduler (``cosine_with_warmup``, ``linear_decay_with_warmup``, ...) and torch-style
global-norm gradient clipping. optax has close relatives, but some details differ in ways that
change training (the two below, and the cosine span in ``make_schedule``), so the update rules are written out here
rather than assembled from optax pieces:

- weight decay is *decoupled from the learning rate*: ``p *= 1 - (lr_t / lr) * weight_decay``,
  i.e. scaled by the schedule multiplier only (optax's ``add_decayed_weights`` followed by the lr
  scaling gives ``lr_t * weight_decay``, 1/lr times weaker);
- Adam's epsilon is added to ``sqrt(v) / sqrt(1 - b2^t)`` as torch does (optax.scale_by_adam's
  ``sqrt(v_hat) + eps`` is the same formula; the Adam paper's "epsilon hat" form used by TF/Keras,
  ``lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, is not);
- the Composer cosine decays over ``max_steps - t_warmup`` steps after warm-up, from 0;
- clipping scales by ``max_norm / (norm + 1e-6)`` as ``torch.nn.utils.clip_grad_norm_`` does.

Step convention: the schedule is evaluated at ``count``, the number of updates already applied
(0 for the first update, so warm-up starts at lr 0, as in Composer), and Adam's bias correction uses
``t = count + 1``. Moments are float32 whatever the params' dtype (``mu_dtype="bfloat16"`` stores
the first moment in bfloat16: it is computed in float32, the update uses the float32 value, and
only what is kept for the next step is rounded); updates come back in the params' dtype. Every
optimizer state is a pytree of arrays (orbax-checkpointable) whose structure does not depend on
the clipping setting, so a run can be resumed with another ``grad_clip_norm``.

    tx = make_optimizer(config.optimizer, config.schedule, max_steps=config.max_steps)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # params are needed for weight decay
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SCHEDULES = ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup", "constant")
OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw", "adamw")
MU_DTYPES = ("float32", "bfloat16")

# The `optimizer` and `scheduler` sections of llm-foundry's pretraining yamls (mpt-125m's lr).
_OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "decoupled_adamw",
    "lr": 6e-4,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "grad_clip_norm": 1.0,
    "decay_norms_and_embeddings": True,
    "mu_dtype": "float32",
}
_SCHEDULE_DEFAULTS: dict[str, Any] = {"name": "cosine_with_warmup", "t_warmup": 100, "alpha_f": 0.1}

# torch.nn.utils.clip_grad_norm_ (and FSDP's) divide max_norm by (total_norm + 1e-6).
TORCH_CLIP_EPS = 1e-6

# Path components that mark a parameter as a norm, a bias or an embedding (see default_decay_mask).
_NO_DECAY_NAMES = ("bias", "embedding", "wte", "wpe")

DecayMask = Any | Callable[[Any], Any] | None

# Where each setting lives in a run config (run_config.py): errors name the key a user sets.
_OPT = "config.optimizer"
_SCHED = "config.schedule"
_TRAIN = "config.train"


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The defaults of a config's ``optimizer`` section, with ``overrides`` applied.

    The defaults are llm-foundry's pretraining yamls (decoupled AdamW, betas (0.9, 0.95), eps 1e-8,
    no weight decay, clipping at norm 1.0) with mpt-125m's lr. ``decay_norms_and_embeddings=True``
    decays every parameter, as Composer does; False excludes norms, biases and embeddings
    (``default_decay_mask``). Lion users set ``name='decoupled_lionw'`` and usually ``b2=0.99``;
    Lion ignores ``eps``. ``mu_dtype='bfloat16'`` keeps the first moment (Adam's m, Lion's only
    moment) in bfloat16, half its memory (as optax's and MaxText's ``mu_dtype``); Adam's second
    moment stays float32.
    """
    _check_keys("optimizer_config", overrides, _OPTIMIZER_DEFAULTS)
    config = ml_collections.ConfigDict(dict(_OPTIMIZER_DEFAULTS))
    config.update(overrides)
    return config


def schedule_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The defaults of a config's ``schedule`` section (llm-foundry's yamls), with ``overrides``.

    ``t_warmup`` is in optimizer steps (Composer's ``100ba``); ``alpha_f`` is the final multiplier.
    """
    _check_keys("schedule_config", overrides, _SCHEDULE_DEFAULTS)
    config = ml_collections.ConfigDict(dict(_SCHEDULE_DEFAULTS))
    config.update(overrides)
    return config


def make_schedule(schedule: Mapping[str, Any], *, lr: float, max_steps: int) -> optax.Schedule:
    """The learning rate ``lr * multiplier(count)`` of a Composer scheduler, as an optax schedule.

    ``count`` is the number of updates already applied (0-based). Multipliers (Composer's code):
    warm-up ``count / t_warmup`` for ``count < t_warmup`` (from 0, so the first update has lr 0),
    then with ``tau = min(1, (count - t_warmup) / (max_steps - t_warmup))`` (0 if max_steps ==
    t_warmup):

    - ``cosine_with_warmup``: ``alpha_f + (1 - alpha_f) * 0.5 * (1 + cos(pi * tau))``;
    - ``linear_decay_with_warmup``: ``1 + tau * (alpha_f - 1)``;
    - ``constant_with_warmup``: 1 (``alpha_f`` is ignored);
    - ``constant``: 1 from the first step (``t_warmup`` and ``alpha_f`` are ignored, so a config
      can switch schedules by name alone).

    Keys: ``name``, ``t_warmup`` (required by the warm-up schedules), ``alpha_f`` (default 0.0, as
    Composer). Raises ValueError for an unknown name or key, and for ``t_warmup > max_steps``
    (Composer refuses it too: the warm-up would never end).
    """
    name, t_warmup, alpha_f = _parse_schedule(schedule, max_steps)
    multiplier = _multiplier_fn(name, t_warmup, alpha_f, max_steps)
    lr = _number(_OPT, "lr", lr, minimum=0.0)

    def schedule_fn(count: jax.typing.ArrayLike) -> jax.Array:
        return lr * multiplier(count)

    return schedule_fn


def default_decay_mask(params: Any) -> Any:
    """True where a parameter gets weight decay: kernels; False for norms, biases and embeddings.

    Composer decays everything; this is the common alternative (Megatron-LM and nanoGPT leave
    biases and norm scales alone: pulling a LayerNorm scale towards 0 regularises nothing useful),
    extended to the token/position embeddings. A parameter is excluded if
    a component of its path contains ``norm`` or ``_ln`` (norm_1, norm_f, q_ln, k_ln), or is
    ``bias``, ``embedding``, ``wte`` or ``wpe``. Works on plain and on boxed (logically
    partitioned) Flax params; the mask has the structure of ``params``.
    """

    def keep(path: tuple[Any, ...], _leaf: Any) -> bool:
        names = [_key_name(k).lower() for k in path]
        return not any("norm" in n or "_ln" in n or n in _NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    optimizer: Mapping[str, Any],
    schedule: Mapping[str, Any],
    *,
    max_steps: int,
    decay_mask: DecayMask = None,
) -> optax.GradientTransformation:
    """Global-norm clipping followed by the named optimizer, driven by ``make_schedule``.

    ``optimizer`` keys (missing ones take ``optimizer_config()``'s defaults): ``name`` in
    ``decoupled_adamw`` (Composer DecoupledAdamW), ``decoupled_lionw`` (llm-foundry DecoupledLionW),
    ``adamw`` (torch.optim.AdamW: decay ``p *= 1 - lr_t * weight_decay``, coupled to the lr as in
    optax.adamw, with torch's eps placement); ``lr``, ``b1``, ``b2``, ``eps`` (Adam only),
    ``weight_decay``, ``grad_clip_norm`` (0 or None: no clipping), ``decay_norms_and_embeddings``,
    ``mu_dtype`` (``float32`` or ``bfloat16``: the stored first moment).

    ``decay_mask`` (a pytree of bools, or a prefix of the params tree, or a callable params ->
    such a tree) says which params are decayed; if None, all are (Composer's default), unless
    ``decay_norms_and_embeddings`` is False, which means ``default_decay_mask``. An explicit
    ``decay_mask`` wins over that key.

    The update needs ``params`` whenever weight_decay is nonzero.
    """
    opt = _parse_optimizer(optimizer)
    name, t_warmup, alpha_f = _parse_schedule(schedule, max_steps)
    multiplier = _multiplier_fn(name, t_warmup, alpha_f, max_steps)
    if decay_mask is None and not opt["decay_norms_and_embeddings"]:
        decay_mask = default_decay_mask

    clip_norm = opt["grad_clip_norm"]
    clip = clip_by_global_norm(clip_norm) if clip_norm else optax.identity()
    if opt["name"] == "decoupled_lionw":
        core = _lion(opt, multiplier, decay_mask)
    else:
        core = _adam(opt, multiplier, decay_mask, decoupled=opt["name"] == "decoupled_adamw")
    return optax.chain(clip, core)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, accumulated in float32 (bf16 squares would lose bits)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: scale all grads by ``min(1, max_norm / (norm + 1e-6))``.

    Differs from optax.clip_by_global_norm only by torch's 1e-6, kept so clipped steps are the same
    as llm-foundry's (Composer's ``gradient_clipping: norm``).
    """
    max_norm = _number(_OPT, "grad_clip_norm", max_norm, minimum=0.0)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        coef = jnp.minimum(max_norm / (global_norm(updates) + TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


class AdamState(NamedTuple):
    """State of (decoupled) AdamW: updates applied so far, first (``mu_dtype``) and second (float32) moments."""

    count: jax.Array
    mu: Any
    nu: Any


class LionState(NamedTuple):
    """State of decoupled Lion: updates applied so far and the momentum (``mu_dtype``)."""

    count: jax.Array
    mu: Any


def _adam(
    opt: Mapping[str, Any], multiplier: Callable[[jax.Array], jax.Array], decay_mask: DecayMask, *, decoupled: bool
) -> optax.GradientTransformation:
    """Composer DecoupledAdamW (``decoupled``) or torch AdamW, as one optax transformation.

    Per step t = count + 1 (torch/Composer):
        p *= 1 - c * wd           c = lr_t / lr (decoupled) or lr_t (torch AdamW)
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    lr, b1, b2, eps, wd = opt["lr"], opt["b1"], opt["b2"], opt["eps"], opt["weight_decay"]
    mu_dtype = jnp.dtype(opt["mu_dtype"])

    def init_fn(params: Any) -> AdamState:
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        mu = jax.tree.map(lambda z: z.astype(mu_dtype), zeros)
        return AdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=jax.tree.map(jnp.copy, zeros))

    def update_fn(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        _require_params(params, wd)
        t = (state.count + 1).astype(jnp.float32)
        mult = multiplier(state.count)
        lr_t = lr * mult
        decay = wd * (_decoupled_factor(mult, lr) if decoupled else lr_t)
        step_size = lr_t / _bias_correction(b1, t)
        sqrt_bc2 = jnp.sqrt(_bias_correction(b2, t))

        mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1.0 - b1) * g.astype(jnp.float32), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), grads, state.nu)

        def leaf_update(m: jax.Array, v: jax.Array, p: jax.Array, decayed: Any) -> jax.Array:
            u = -step_size * (m / (jnp.sqrt(v) / sqrt_bc2 + eps))
            return _with_decay(u, p, decayed, decay, wd).astype(p.dtype)

        ps, mask = _params_and_mask(grads, params, decay_mask)
        updates = jax.tree.map(leaf_update, mu, nu, ps, mask)
        mu = jax.tree.map(lambda m: m.astype(mu_dtype), mu)  # stored rounded; the update used float32
        return updates, AdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _lion(
    opt: Mapping[str, Any], multiplier: Callable[[jax.Array], jax.Array], decay_mask: DecayMask
) -> optax.GradientTransformation:
    """llm-foundry DecoupledLionW as one optax transformation.

        p *= 1 - (lr_t / lr) * wd
        p -= lr_t * sign(lerp(m, g, 1 - b1))        sign(0) = 0
        m = lerp(m, g, 1 - b2)
    with torch.lerp's arithmetic, so the float32 rounding is torch's too.
    """
    lr, b1, b2, wd = opt["lr"], opt["b1"], opt["b2"], opt["weight_decay"]
    mu_dtype = jnp.dtype(opt["mu_dtype"])

    def init_fn(params: Any) -> LionState:
        mu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), mu_dtype), params)
        return LionState(count=jnp.zeros((), jnp.int32), mu=mu)

    def update_fn(grads: Any, state: LionState, params: Any = None) -> tuple[Any, LionState]:
        _require_params(params, wd)
        mult = multiplier(state.count)
        lr_t = lr * mult
        decay = wd * _decoupled_factor(mult, lr)

        def leaf_update(g: jax.Array, m: jax.Array, p: jax.Array, decayed: Any) -> jax.Array:
            u = -lr_t * jnp.sign(_lerp(m.astype(jnp.float32), g.astype(jnp.float32), 1.0 - b1))
            return _with_decay(u, p, decayed, decay, wd).astype(p.dtype)

        ps, mask = _params_and_mask(grads, params, decay_mask)
        updates = jax.tree.map(leaf_update, grads, state.mu, ps, mask)
        mu = jax.tree.map(
            lambda g, m: _lerp(m.astype(jnp.float32), g.astype(jnp.float32), 1.0 - b2).astype(mu_dtype), grads, state.mu
        )
        return updates, LionState(count=optax.safe_increment(state.count), mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _lerp(start: jax.Array, end: jax.Array, weight: float) -> jax.Array:
    """torch.lerp for a Python weight: two formulas, whichever is exact at its end of [0, 1]."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _bias_correction(beta: float, t: jax.Array) -> jax.Array:
    """1 - beta^t to float32 accuracy: beta^t in float32 would put beta's rounding error into it,
    1.3e-5 relative for beta = 0.999 (torch computes it in double), so use -expm1(t * log(beta))."""
    log_beta = math.log(beta) if beta > 0 else -math.inf
    return -jnp.expm1(t * jnp.float32(log_beta))


def _decoupled_factor(mult: jax.Array, lr: float) -> jax.Array | float:
    """Composer's ``lr / initial_lr if initial_lr else 1.0`` (the schedule multiplier)."""
    return mult if lr else 1.0


def _with_decay(u: jax.Array, p: jax.Array, decayed: Any, decay: jax.Array, wd: float) -> jax.Array:
    """Adds ``-decay * p`` (the change from ``p *= 1 - decay``) where the mask says so."""
    if wd == 0:  # Composer skips the decay when weight_decay == 0
        return u
    if isinstance(decayed, bool | np.bool_):
        return u - decay * p.astype(jnp.float32) if decayed else u
    return u - jnp.where(decayed, decay, 0.0) * p.astype(jnp.float32)


def _params_and_mask(grads: Any, params: Any, decay_mask: DecayMask) -> tuple[Any, Any]:
    """The params (the updates' dtype and the decay's input) and the decay mask, both full trees.

    Without params (allowed only when weight_decay is 0) the grads stand in for them: the updates
    then take the grads' dtype, and nothing is decayed.
    """
    if params is None:
        return grads, jax.tree.map(lambda _: False, grads)
    if decay_mask is None:
        mask = jax.tree.map(lambda _: True, params)
    else:
        mask = decay_mask(params) if callable(decay_mask) else decay_mask
        # A mask may be a prefix of the params tree: broadcast each of its leaves over its subtree.
        mask = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    return params, mask


def _require_params(params: Any, wd: float) -> None:
    if params is None and wd != 0:
        raise ValueError("weight_decay is nonzero: pass params to update(grads, state, params)")


def _multiplier_fn(name: str, t_warmup: int, alpha_f: float, max_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The Composer schedule multiplier as a jittable function of the update count."""
    decay_steps = max_steps - t_warmup

    def multiplier(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(count).astype(jnp.float32)
        if name == "constant":
            return jnp.ones_like(t)
        if name == "constant_with_warmup":
            after = jnp.ones_like(t)
        else:
            # Composer: tau = min(1, (t - t_warmup) / (t_max - t_warmup)) if t_max > t_warmup else 0.
            tau = jnp.minimum((t - t_warmup) / decay_steps, 1.0) if decay_steps > 0 else jnp.zeros_like(t)
            if name == "cosine_with_warmup":
                after = alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + jnp.cos(jnp.pi * tau))
            else:  # linear_decay_with_warmup (Composer's alpha_i = 1)
                after = 1.0 + tau * (alpha_f - 1.0)
        if t_warmup == 0:
            return after
        return jnp.where(t < t_warmup, t / t_warmup, after)

    return multiplier


def _parse_schedule(schedule: Mapping[str, Any], max_steps: int) -> tuple[str, int, float]:
    cfg = _as_dict(schedule)
    _check_keys(_SCHED, cfg, _SCHEDULE_DEFAULTS)
    name = cfg.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name {_SCHED}.name={name!r}; known: {', '.join(SCHEDULES)}")
    max_steps = _integer(_TRAIN, "max_steps", max_steps)
    if name == "constant":
        return name, 0, 1.0
    if cfg.get("t_warmup") is None:
        raise ValueError(f"{_SCHED}.name={name!r} needs {_SCHED}.t_warmup (in steps)")
    t_warmup = _integer(_SCHED, "t_warmup", cfg["t_warmup"])
    if t_warmup > max_steps:
        raise ValueError(
            f"{_SCHED}.t_warmup={t_warmup} is greater than max_steps={max_steps} ({_TRAIN}.max_steps): "
            "the warm-up would never end"
        )
    alpha_f = _number(_SCHED, "alpha_f", cfg.get("alpha_f", 0.0))
    return name, t_warmup, alpha_f


def _parse_optimizer(optimizer: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _as_dict(optimizer)
    _check_keys(_OPT, cfg, _OPTIMIZER_DEFAULTS)
    opt = {**_OPTIMIZER_DEFAULTS, **cfg}
    if opt["name"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer name {_OPT}.name={opt['name']!r}; known: {', '.join(OPTIMIZERS)}")
    opt["lr"] = _number(_OPT, "lr", opt["lr"], minimum=0.0)
    for beta in ("b1", "b2"):
        opt[beta] = _number(_OPT, beta, opt[beta], minimum=0.0)
        if opt[beta] >= 1.0:
            raise ValueError(f"{_OPT}.{beta}={opt[beta]} must be < 1")
    opt["eps"] = _number(_OPT, "eps", opt["eps"], minimum=0.0)
    opt["weight_decay"] = _number(_OPT, "weight_decay", opt["weight_decay"], minimum=0.0)
    if opt["grad_clip_norm"] is not None:
        opt["grad_clip_norm"] = _number(_OPT, "grad_clip_norm", opt["grad_clip_norm"], minimum=0.0)
    if not isinstance(opt["decay_norms_and_embeddings"], bool | np.bool_):
        raise ValueError(f"{_OPT}.decay_norms_and_embeddings must be a bool, got {opt['decay_norms_and_embeddings']!r}")
    if opt["mu_dtype"] not in MU_DTYPES:
        raise ValueError(f"{_OPT}.mu_dtype={opt['mu_dtype']!r}: expected one of {', '.join(MU_DTYPES)}")
    return opt


def _as_dict(section: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict from a dict or an ml_collections ConfigDict (which is not a Mapping)."""
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def _check_keys(where: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; known: {sorted(known)}")


def _number(where: str, key: str, value: Any, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{where}.{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ValueError(
            f"{where}.{key}={value} must be finite" + (f" and >= {minimum}" if minimum is not None else "")
        )
    return value


def _integer(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{where}.{key} must be a non-negative integer (steps), got {value!r}")
    return int(value)


def _key_name(key: Any) -> str:
    """The name in one pytree path entry (dict key, attribute, or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
