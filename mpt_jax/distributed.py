"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the cluster's environment.

Order of precedence: explicit ``--coordinator_address/--num_processes/--process_id`` flags; the
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` environment variables (our
Kubernetes JobSet and launch/local.sh set them); otherwise JAX's own detection of SLURM (more than
one task) and multi-host TPU VMs. A single process needs nothing.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins the job's processes (idempotent); does nothing for a single process."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator_address={coordinator_address} needs num_processes and process_id "
                "(flags --num_processes/--process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
        if num_processes == 1:
            return
        host, _, port = coordinator_address.rpartition(":")
        kwargs = {}
        if host in ("127.0.0.1", "localhost"):
            kwargs["coordinator_bind_address"] = coordinator_address  # local runs: no other interface
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
        )
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
