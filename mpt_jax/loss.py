"""Next-token cross-entropy straight from the final hidden states and the head's weights.

The [tokens, vocab] logits of a training batch are the largest tensors of a small model's step
(125m at 4 x 512: 2048 x 50432 float32 = 394 MiB, and autodiff keeps their softmax too). Here they
exist one chunk of positions at a time: the forward pass computes each chunk's logits, its loss
and, since the loss is a sum whose gradient with respect to the logits is known in closed form
(softmax minus the one-hot target, times the token's weight), the chunk's gradients with respect
to the hidden states and the head weights. The backward pass only scales those by the incoming
cotangent. Same FLOPs as the unfused head, no recomputation, and a few MiB of logits alive instead
of several copies of the whole block.

The head's math is the model's (``model.final_logits``: logit multiplier, final softcap), its
products in the compute dtype with float32 accumulation (``ops``); losses are float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mpt_jax.config import MPTConfig
from mpt_jax.model import final_logits
from mpt_jax.ops import accumulation_dtype

# Logits of one chunk stay under about this many float32 elements (16 Mi: 64 MiB). Twice the
# chunk of 8 Mi measured 4% (float32) to 14% (bfloat16) faster on the 125m head and added 0.05 GiB
# (2.5%) to its no-remat step; 32 Mi, a few percent more for 0.19 GiB.
CHUNK_ELEMENTS = 1 << 24


def chunk_length(batch: int, length: int, vocab: int) -> int:
    """Positions per chunk: a power of two with batch x chunk x vocab <= CHUNK_ELEMENTS (at least
    16, at most the length rounded up to a power of two)."""
    chunk = 16
    while chunk < length and batch * (2 * chunk) * vocab <= CHUNK_ELEMENTS:
        chunk *= 2
    return chunk


def next_token_loss(
    hidden: jax.Array, weight: jax.Array, tokens: jax.Array, loss_mask: jax.Array, cfg: MPTConfig, *, tied: bool
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies over counted tokens, number of counted tokens), float32.

    hidden: [B, T, d] (the model with ``head=False``); weight: the tied embedding [V, d]
    (``tied=True``) or the lm_head kernel [d, V]; tokens, loss_mask: [B, T]. Position t predicts
    token t + 1 and counts when ``loss_mask[t + 1] == 1``, as ``steps.token_losses`` on logits.
    """
    batch, length, _ = hidden.shape
    h = hidden[:, :-1]
    targets = tokens[:, 1:].astype(jnp.int32)
    weights = loss_mask[:, 1:].astype(jnp.float32)
    n = length - 1
    chunk = chunk_length(batch, n, cfg.vocab_size)
    pad = -n % chunk
    if pad:  # padded positions weigh 0
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return _chunked_loss(h, weight, targets, weights, _Head(cfg, tied, chunk)), jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class _Head:
    """The head's static facts (hashable: a nondiff argument of the custom VJP)."""

    cfg: MPTConfig
    tied: bool
    chunk: int

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.cfg.dtype)

    def raw(self, h: jax.Array, w: jax.Array) -> jax.Array:
        """float32 head product [B, c, V] of hidden [B, c, d] and the weight, in the compute dtype."""
        spec = "bcd,vd->bcv" if self.tied else "bcd,dv->bcv"
        return jnp.einsum(spec, h.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)

    def logits(self, z: jax.Array) -> jax.Array:
        return final_logits(z, self.cfg)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...]: scanned over the length, the batch axis (sharded
    over devices) kept whole."""
    b, t = x.shape[:2]
    return x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _chunk_losses(head: _Head, z, targets, weights):
    """(float32 logits [B, c, V], their log-sum-exp, per-position losses [B, c] weighted) from the
    head's raw product z."""
    logits = head.logits(z)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logits, lse, (lse - target_logit) * weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss(h, w, targets, weights, head: _Head) -> jax.Array:
    def body(total, xs):
        hc, tc, wc = xs
        return total + jnp.sum(_chunk_losses(head, head.raw(hc, w), tc, wc)[2]), None

    xs = (_chunks(h, head.chunk), _chunks(targets, head.chunk), _chunks(weights, head.chunk))
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _chunked_loss_fwd(h, w, targets, weights, head: _Head):
    acc = accumulation_dtype(head.dtype)
    wc = w.astype(head.dtype)

    def body(carry, xs):
        total, dw = carry
        hc, tc, wtc = xs
        z = head.raw(hc, wc)
        logits, lse, losses = _chunk_losses(head, z, tc, wtc)
        # d(sum of losses)/d(logits) = (softmax - one_hot(target)) * weight, then back through
        # the softcap and the multiplier to the raw product z.
        dlogits = jnp.exp(logits - lse[..., None])
        dlogits = dlogits - jax.nn.one_hot(tc, logits.shape[-1], dtype=dlogits.dtype)
        dlogits = dlogits * wtc[..., None]
        dz = jax.vjp(head.logits, z)[1](dlogits)[0].astype(head.dtype)
        if head.tied:  # z = h . w^T with w [V, d]
            dh = jnp.einsum("bcv,vd->bcd", dz, wc, preferred_element_type=acc)
            dw = dw + jnp.einsum("bcv,bcd->vd", dz, hc.astype(head.dtype), preferred_element_type=acc)
        else:  # z = h . w with w [d, V]
            dh = jnp.einsum("bcv,dv->bcd", dz, wc, preferred_element_type=acc)
            dw = dw + jnp.einsum("bcv,bcd->dv", dz, hc.astype(head.dtype), preferred_element_type=acc)
        return (total + jnp.sum(losses), dw), dh.astype(h.dtype)

    xs = (_chunks(h, head.chunk), _chunks(targets, head.chunk), _chunks(weights, head.chunk))
    # The weight gradient's running sum: w * 0 rather than fresh zeros, so that it is laid out
    # (sharded over devices) as the weight is.
    init = (jnp.zeros((), jnp.float32), w.astype(acc) * 0)
    (total, dw), dh = jax.lax.scan(body, init, xs)
    dh = dh.swapaxes(0, 1).reshape(h.shape)
    return total, (dh, dw.astype(w.dtype))


def _chunked_loss_bwd(head, residuals, g):
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
