"""Describe a config's model: parameters by part, and a timed forward pass on random tokens.

    python -m mpt_jax.summary --config=configs/tiny.py [--config.model.n_layers=8] [--batch=2 --length=128]

Shapes come from ``jax.eval_shape`` (nothing is allocated), so any size can be summarised; the
forward pass runs only with ``--forward`` (default on) and only when the model is small enough
(``--max_forward_params``).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpt_jax import cli
from mpt_jax.config import MPTConfig
from mpt_jax.model import MPT, flat_params, init_params, param_shapes
from mpt_jax.run_config import model_config


def describe(cfg: MPTConfig) -> tuple[str, int]:
    shapes = nn.meta.unbox(param_shapes(cfg))
    lines, total = [], 0
    for path, leaf in flat_params(shapes):
        name = "/".join(path)
        lines.append(f"  {name:<40s} {str(tuple(leaf.shape)):<28s} {leaf.size:>16,d}")
        total += leaf.size
    lines.append(f"  {'total':<40s} {'':<28s} {total:>16,d}")
    return "\n".join(lines), total


def main(argv) -> None:
    del argv
    from absl import flags

    f = flags.FLAGS
    cfg = model_config(cli.config_from_flags("config"))
    table, total = describe(cfg)
    print(
        f"MPT d_model={cfg.d_model} n_heads={cfg.n_heads} (kv {cfg.num_kv_heads}) n_layers={cfg.n_layers} "
        f"ffn={cfg.ffn_dim} vocab={cfg.vocab_size} max_seq_len={cfg.max_seq_len} alibi={cfg.alibi}"
    )
    print(table)
    if not f.forward:
        return
    if total > f.max_forward_params:
        print(f"forward pass skipped: {total:,d} parameters > --max_forward_params={f.max_forward_params:,d}")
        return
    length = f.length or cfg.max_seq_len
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (f.batch, length), 0, cfg.vocab_size)
    forward = jax.jit(lambda p, t: MPT(cfg).apply({"params": p}, t))
    logits = forward(params, tokens).block_until_ready()  # compile
    start = time.perf_counter()
    logits = forward(params, tokens).block_until_ready()
    seconds = time.perf_counter() - start
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
    print(
        f"forward [{f.batch}x{length}] on {jax.devices()[0].platform}: {seconds * 1e3:.1f} ms, "
        f"{f.batch * length / seconds:,.0f} tokens/s; loss on random tokens {float(loss):.3f} "
        f"(ln vocab = {jnp.log(cfg.vocab_size):.3f})"
    )


def _define_flags() -> None:
    """Flags exist only when summary runs as a program (train and plan define --config too)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/tiny.py", lock_config=True)
    flags.DEFINE_bool("forward", True, "run and time a forward pass on random tokens")
    flags.DEFINE_integer("batch", 2, "batch size of the forward pass")
    flags.DEFINE_integer("length", 0, "sequence length of the forward pass (0: max_seq_len)")
    flags.DEFINE_integer("max_forward_params", 200_000_000, "skip the forward pass above this size")


if __name__ == "__main__":
    cli.run("summary", _define_flags, main)
