"""``python -m mpt_jax.serve``: load a model and serve the OpenAI API over HTTP (see the package docstring)."""

from __future__ import annotations

import os

from absl import logging

from mpt_jax.serve import ENV_API_KEY


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", None, "a training workdir, an mpt-jax checkpoint, an HF folder or a hub id")
    flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    flags.DEFINE_integer("port", 8000, "TCP port")
    flags.DEFINE_integer("max_batch", 16, "cache rows: requests decoded at once")
    flags.DEFINE_integer("max_queue", 64, "requests that may wait for a row; beyond it, 429")
    flags.DEFINE_integer("max_seq_len", None, "context length of a row (ALiBi/RoPE models may go past training length)")
    flags.DEFINE_enum("quantize", None, ["int8"], "weight-only int8")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "params and compute dtype (default: as stored)")
    flags.DEFINE_string(
        "format",
        None,
        "chat format: chatml, chat_template or an instruct template (default: chosen from the tokenizer)",
    )
    flags.DEFINE_string("model_name", None, "the name clients pass as 'model' (default: --model as given)")
    flags.DEFINE_string("api_key", None, f"require 'Authorization: Bearer KEY' (default: ${ENV_API_KEY} if set)")
    flags.DEFINE_integer("max_body_bytes", 1 << 20, "largest request body accepted (413 beyond)")
    flags.DEFINE_list(
        "mesh", None, "data,fsdp,tensor sizes of a device mesh to shard the model over (default: one device)"
    )
    flags.DEFINE_bool("access_log", True, "log every HTTP request")
    flags.DEFINE_bool("warmup", True, "compile every prefill shape before serving (no request waits for one)")


def main(argv) -> None:
    del argv
    from absl import flags

    f = flags.FLAGS
    if not f.model:
        raise ValueError("--model=PATH_OR_HUB is required")
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        if f[name].value < 1:
            raise ValueError(f"--{name}={f[name].value} must be positive")
    if not 0 < f.port < 65536:
        raise ValueError(f"--port={f.port} must be in [1, 65535]")
    try:
        import uvicorn

        from mpt_jax.serve.app import build_service, create_app
    except ImportError as e:
        raise ValueError(f"serving needs the 'serve' extra ({e}): pip install -e '.[serve]'") from None
    from mpt_jax.load import load

    mesh = None
    if f.mesh:
        from mpt_jax.sharding import make_mesh

        try:
            shape = [int(x) for x in f.mesh]
        except ValueError:
            raise ValueError(f"--mesh={','.join(f.mesh)}: expected three integers data,fsdp,tensor") from None
        if len(shape) != 3:
            raise ValueError(f"--mesh={','.join(f.mesh)}: expected three integers data,fsdp,tensor")
        mesh = make_mesh(shape)
    cfg, params, tokenizer = load(
        f.model, dtype=f.dtype, quantize=f.quantize, max_seq_len=f.max_seq_len, mesh=mesh, scan_layers=False
    )
    service = build_service(
        cfg,
        params,
        tokenizer,
        model_name=f.model_name or f.model,
        max_batch=f.max_batch,
        max_queue=f.max_queue,
        prompt_format=f.format,
        mesh=mesh,
        warmup=f.warmup,
    )
    api_key = f.api_key or os.environ.get(ENV_API_KEY) or None
    app = create_app(service, api_key=api_key, max_body_bytes=f.max_body_bytes)
    logging.info(
        "serve: %s as %r on http://%s:%d (%d rows x %d positions, queue %d, format %s%s)",
        f.model,
        service.model_name,
        f.host,
        f.port,
        f.max_batch,
        service.context_len,
        f.max_queue,
        service.fmt.name,
        ", API key required" if api_key else "",
    )
    try:
        uvicorn.run(app, host=f.host, port=f.port, access_log=f.access_log, log_level="info")
    finally:
        service.worker.stop()


if __name__ == "__main__":
    from mpt_jax import cli

    cli.run("serve", _define_flags, main)
