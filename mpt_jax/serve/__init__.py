"""An OpenAI-compatible HTTP server with continuous batching over cache rows.

    python -m mpt_jax.serve --model=PATH_OR_HUB [--host=127.0.0.1 --port=8000 --max_batch=16
        --max_seq_len= --max_queue=64 --quantize=int8 --dtype= --format= --api_key= --mesh=1,1,8]

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streamed as server-sent
events with ``stream=true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
One model thread owns a ``generate.Batcher`` over ``--max_batch`` cache rows of ``max_seq_len``
positions: requests are prefilled into free rows between decode steps and leave their row the
moment they end or their client goes away. The modules, each with one job:

- ``protocol``: the OpenAI request/response shapes and error bodies (no JAX, no HTTP);
- ``worker``: the model thread and its bounded queue (the backpressure);
- ``metrics``: the Prometheus text format;
- ``app``: the FastAPI routes, the API key and the body limit (``build_service``, ``create_app``);
- ``__main__``: the command line.

Needs the ``serve`` extra: ``pip install -e ".[serve]"``. See docs/serving.md.
"""

from __future__ import annotations

ENV_API_KEY = "MPT_JAX_API_KEY"  # the API key when --api_key is not given
