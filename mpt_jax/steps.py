"""The pure functions jit compiles: loss, train step (with gradient accumulation), eval step.

No I/O, no globals: everything a step needs comes in through its arguments, so the same step runs
on one CPU or a pod, and two runs from the same state and batch give the same bits.

Loss convention (llm-foundry's): token t of a row is predicted from the tokens before it and counts
when ``loss_mask[t] == 1``; the loss is the mean over counted tokens of the whole global batch, so
k micro-batches of b rows give the same update as one batch of k*b rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mpt_jax.config import GRAD_DTYPES, MPTConfig
from mpt_jax.loss import next_token_loss
from mpt_jax.model import MPT, init_params, lookup

TrainState = dict[str, Any]  # {"step": int32[], "params": tree, "opt_state": tree, "rng": key}
Batch = dict[str, jax.Array]  # tokens, segment_ids, positions, loss_mask: [rows, seq_len] int32


# XLA:CPU's memory-optimized scheduler orders a float32 step's operations to lower its peak: the
# 125m float32 step's temporaries 1.93 -> 1.78 GiB without remat, 0.80 -> 0.77 GiB with remat
# "full", at the same speed (13.81 against 14.04 s a step, alternating in one process). In
# bfloat16 it saved as much (1.42 -> 1.16 GiB) but the step ran 13% slower (6.41 against 5.58 s),
# so bfloat16 keeps the default order (docs/performance.md).
CPU_FLOAT32_TRAIN_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def train_compiler_options(cfg: MPTConfig, platform: str | None = None) -> dict[str, str] | None:
    """``compiler_options`` for jitting ``train_step`` of ``cfg`` on ``platform`` (default: JAX's
    default backend); None where there are none."""
    on_cpu = (platform or jax.default_backend()) == "cpu"
    return dict(CPU_FLOAT32_TRAIN_OPTIONS) if on_cpu and jnp.dtype(cfg.dtype) == jnp.float32 else None


def init_state(cfg: MPTConfig, optimizer: optax.GradientTransformation, rng: jax.Array, params=None) -> TrainState:
    """A fresh train state; ``params`` (e.g. a converted checkpoint) replace the random init."""
    init_rng, rng = jax.random.split(rng)
    if params is None:
        params = init_params(cfg, init_rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "rng": rng}


def token_losses(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies over counted tokens, number of counted tokens), float32."""
    targets = batch["tokens"][:, 1:]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def loss_fn(
    params,
    batch: Batch,
    cfg: MPTConfig,
    *,
    rng: jax.Array | None = None,
    train: bool = False,
    embeddings: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, counted tokens) of one (micro-)batch.

    Float heads go through ``loss.next_token_loss`` (logits a chunk at a time, the same numbers
    as ``token_losses`` on the whole logits); an int8 head (a quantized model's eval) through the
    model's logits. ``embeddings``: the tokens' rows of the embedding table, looked up by the
    caller (``loss_and_grads``)."""
    head = params["wte"] if cfg.tie_word_embeddings else params.get("lm_head", {})
    weight = head.get("embedding" if cfg.tie_word_embeddings else "kernel")
    fused = weight is not None and jnp.issubdtype(weight.dtype, jnp.floating)
    out = MPT(cfg).apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"] if cfg.attn_uses_sequence_id else None,
        positions=batch["positions"] if cfg.uses_positions else None,
        deterministic=not train,
        rngs={"dropout": rng} if (train and rng is not None) else {},
        head=not fused,
        embeddings=embeddings,
    )
    if fused:
        return next_token_loss(out, weight, batch["tokens"], batch["loss_mask"], cfg, tied=cfg.tie_word_embeddings)
    return token_losses(out, batch)


def loss_and_grads(
    params, batch: Batch, cfg: MPTConfig, rng: jax.Array, scale: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """((summed loss, counted tokens), gradients of ``scale`` x the summed loss) of one training
    micro-batch.

    ``scale`` (1 / the global batch's token count, known before the forward pass) enters as the
    loss's cotangent, so the gradients come out already divided: no pass over them afterwards and
    no second copy of the largest. The token embeddings are looked up outside the differentiated
    function and their gradient is scattered into the table's gradient afterwards: with a tied
    head that gradient already holds the head's [vocab, d_model] product, and the scatter adds
    into it in place (autodiff of the lookup kept the lookup's gradient and the sum beside it,
    148 MiB each at 125m)."""
    table = params["wte"]["embedding"]
    tokens = batch["tokens"]
    embeddings = lookup(table, tokens, cfg.dtype)

    def loss(p, e):
        loss_sum, count = loss_fn(p, batch, cfg, rng=rng, train=True, embeddings=e)
        return loss_sum * scale, (loss_sum, count)

    (_, value), (grads, d_embeddings) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, embeddings)
    rows = d_embeddings.reshape(-1, table.shape[-1]).astype(table.dtype)
    d_table = grads["wte"]["embedding"].at[tokens.reshape(-1)].add(rows)
    grads = {**grads, "wte": {**grads["wte"], "embedding": d_table}}
    return value, grads


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    cfg: MPTConfig,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    micro_batches: int = 1,
    grad_dtype: str = "float32",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a global batch, accumulated over ``micro_batches`` with lax.scan.

    ``grad_dtype`` (``config.train.grad_dtype``) is the dtype of the gradients and of their sum over
    micro-batches. ``"float32"`` (the default): the gradients of the params as they are, summed in
    float32. ``"bfloat16"`` (FSDP's PURE mixed precision): the loss is differentiated at the params
    cast to bfloat16, so each micro-batch's gradients and their running sum are bfloat16, half the
    bytes of float32 each (beside a bfloat16 copy of the params). Either way the gradients are of the
    loss already divided by the global batch's token count (``loss_and_grads``), and the optimizer
    gets float32 gradients (for float32 params): the clipping norm and the update of the float32
    masters are float32.
    """
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"train_step: grad_dtype={grad_dtype!r}; expected one of {', '.join(GRAD_DTYPES)}")
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], state["step"])
    rows = batch["tokens"].shape[0]
    if rows % micro_batches:
        raise ValueError(f"train_step: {rows} rows do not split into {micro_batches} micro-batches")
    # Micro-batch i takes rows i, i+k, i+2k, ...: with rows sharded over devices, every micro-batch
    # is spread over all of them.
    micro = jax.tree.map(lambda x: x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
    # The loss's denominator (the counted tokens), known before the forward pass: the gradients
    # come out divided by it.
    counted = jnp.sum(batch["loss_mask"][:, 1:]).astype(jnp.float32)
    denom = jnp.maximum(counted, 1.0)

    def grad_fn(p, b, r):
        return loss_and_grads(p, b, cfg, r, 1.0 / denom)

    sum_dtype = jnp.dtype(grad_dtype)
    if sum_dtype == jnp.float32:
        at = params  # float32 (or bfloat16) params: their own gradients, summed in float32
    else:  # the gradients take the dtype of what they are taken at
        at = jax.tree.map(lambda p: p.astype(sum_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

    def accumulate(carry, inputs):
        grads, loss_sum = carry
        index, mb = inputs
        (loss, _), g = grad_fn(at, mb, jax.random.fold_in(rng, index))
        grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        return (grads, loss_sum + loss), None

    if micro_batches == 1:  # no accumulation buffer: one set of gradients in memory, not two
        (loss_sum, _), grads = grad_fn(at, batch, jax.random.fold_in(rng, 0))
        grads = jax.tree.map(lambda g: g.astype(sum_dtype), grads)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, sum_dtype), params)
        init = (zeros, jnp.zeros((), jnp.float32))
        (grads, loss_sum), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss = loss_sum / denom
    metrics = {
        "loss": loss,
        "perplexity": jnp.exp(loss),
        "lr": schedule(state["step"]),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_params),
        "tokens": counted,
    }
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics


def eval_step(params, batch: Batch, *, cfg: MPTConfig) -> dict[str, jax.Array]:
    """Summed loss and token count of one eval batch (callers add them up across batches)."""
    loss_sum, count = loss_fn(params, batch, cfg, train=False)
    return {"loss_sum": loss_sum, "tokens": count}
