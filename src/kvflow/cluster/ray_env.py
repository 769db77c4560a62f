"""Starting or joining Ray, with one-line errors that name the fix.

A cluster of one machine needs no Ray setup: `ray.init()` starts a local Ray for this process,
sized so the instances fit (num_cpus = instances x threads, at least the machine's cores).
`--ray-address` joins a running cluster instead (`ray start --head` on one machine, `ray start
--address ...` on the others)."""
from __future__ import annotations

import logging
import os

from kvflow.errors import KvflowError

logger = logging.getLogger(__name__)


class ClusterError(KvflowError, RuntimeError):
    """Ray is missing or unreachable, or an instance could not start."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("serving on several instances needs Ray, which is not installed: "
                           "pip install 'ray==2.60.0'") from None
    return ray


def preload_worker() -> None:
    """Ray runs this in each worker process as it starts (worker_process_setup_hook): the imports
    an instance needs (torch, the engine, transformers' tokenizers) happen before any instance is
    asked for, not during a cold start."""
    try:
        import transformers  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

        import kvflow.cluster.instance  # noqa: F401 - torch and the engine with it
        import kvflow.model.loader  # noqa: F401
        import torch
        with torch.device("meta"):  # the model is built on meta: its first init imports torch._dynamo (~1-3 s)
            torch.nn.Embedding(2, 2)
    except Exception:  # noqa: BLE001 - a failed preload only costs the time it would have saved
        logger.exception("worker preload failed")


RUNTIME_ENV = {"worker_process_setup_hook": "kvflow.cluster.ray_env.preload_worker"}


def init_ray(address: str | None, num_cpus: int):
    """ray.init once per process; returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=RUNTIME_ENV)
        else:
            # Enough logical CPUs for every instance even on a 2-core machine (instances of one
            # thread each share the cores; Ray's count is bookkeeping, not pinning).
            ray.init(num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False, runtime_env=RUNTIME_ENV)
    except ConnectionError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({e}); start it with `ray start --head` "
                           "or leave --ray-address out to run Ray locally") from None
    except Exception as e:  # noqa: BLE001 - Ray raises many types when it cannot start
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise ClusterError(f"cannot start or join {where}: {type(e).__name__}: {e}; check `ray status`, "
                           "or run `ray stop` to clear a stale local Ray") from None
    return ray
