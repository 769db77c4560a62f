"""Live migration of a running request between two instances (Llumnix), driven from the cluster
client; the instances do the engine-side steps (instance.py).

1. Stages, while the request keeps decoding on the source: read the KV of its full blocks computed
   since the last stage, write it into blocks the target holds for it. Repeat while a stage still
   leaves more than a block behind (decoding adds one token per step, a stage copies many).
2. The stop: the source suspends the request (out of its schedule, blocks kept) and exports its
   state with the KV not yet copied (the last, partial block or two); the target imports it on the
   blocks filled ahead and continues decoding. Downtime is this step alone.
3. The source releases the request (frees its blocks).

Any failure leaves the request where it was: the target lacks blocks (a stage or the import is
refused: the target frees what it held, the source resumes), or the request finishes or is
preempted mid-copy (nothing to move; the target frees its blocks). One-sample requests only."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

MAX_STAGES = 8


@dataclass
class MigrationReport:
    request_id: str
    source: str
    target: str
    reason: str  # why it moved ("balance", "priority", "drain", "manual")
    moved: bool = False
    failure: str | None = None  # why it stayed, when it did
    stages: int = 0  # copy stages while the request kept running
    tokens_ahead: int = 0  # tokens whose KV was copied while it ran
    tokens_stopped: int = 0  # tokens whose KV was copied during the stop
    downtime_s: float = 0.0  # the request was stopped this long
    total_s: float = 0.0


async def live_migrate(src, dst, report: MigrationReport, migration_id: str, block_size: int,
                       on_moved: Callable[[], None]) -> MigrationReport:
    """Move report.request_id from actor `src` to actor `dst`; on_moved() runs once the target
    holds the request (before the source lets go). Returns the filled-in report."""
    t0 = time.perf_counter()
    rid = report.request_id
    suspended = imported = False
    try:
        copied = await _copy_ahead(src, dst, report, migration_id, block_size)
        if copied is None:
            report.failure = "the request finished or cannot move live (n > 1)"
            await dst.cancel.remote(migration_id)
            return report
        stop = time.perf_counter()
        seq, exported = await src.suspend.remote(rid, copied)
        if exported is None:
            report.failure = "the request finished during the copy"
            await dst.cancel.remote(migration_id)
            return report
        suspended = True
        await dst.finish_import.remote(migration_id, exported, seq)
        imported = True
        report.downtime_s = time.perf_counter() - stop
        report.tokens_stopped = sum(kv[0].shape[2] for kv in exported.kv if kv)
        report.tokens_ahead = exported.kv_from
        on_moved()
        await src.release.remote(rid)
        report.moved = True
    except BaseException as e:  # a failed migration leaves the request on the source
        report.failure = f"{type(e).__name__}: {_message(e)}"
        # Not awaited: this also runs when the migration is cancelled (shutdown), and neither
        # instance may be left holding the request's blocks, or the request suspended.
        if imported:  # it runs on the target now: the source must let go
            src.release.remote(rid)
            report.moved = True
        elif suspended:
            src.resume.remote(rid)
        if not imported:
            dst.cancel.remote(migration_id)
        if not isinstance(e, Exception):
            raise
    finally:
        report.total_s = time.perf_counter() - t0
    return report


async def _copy_ahead(src, dst, report: MigrationReport, migration_id: str, block_size: int) -> int | None:
    """The stages; returns the tokens copied ahead, or None if the request cannot move."""
    copied = 0
    for _ in range(MAX_STAGES):
        meta_ref, kv_ref = src.read_stage.options(num_returns=2).remote(report.request_id, copied)
        meta = await meta_ref
        if meta is None:
            return None
        if meta["upto"] > copied:
            await dst.reserve_stage.remote(migration_id, copied, kv_ref)  # the KV goes actor to actor
            copied = meta["upto"]
            report.stages += 1
        if meta["computed"] - copied < 2 * block_size:
            break
    return copied


def _message(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # Ray wraps what an actor raised
    return str(cause if cause is not None else e).splitlines()[0]
