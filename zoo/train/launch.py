"""Start the ranks of a data-parallel run on this machine, as `torchrun --standalone` would, from inside zoo.

`launch(n, fn, *args)` runs `fn(*args)` in n spawned processes through torch.distributed's elastic
launcher (a standalone c10d rendezvous on a free local port; the environment of each rank — RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT — as under torchrun). Unlike torchrun it reports a failure in
one line: each rank writes its error text into torch.distributed.elastic's error file (zoo.cli.report)
and prints nothing, and the launcher prints the text of the failure that caused the others, once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def launch(nprocs: int, fn: Callable, *args) -> int:
    """Run `fn(*args)` on `nprocs` local ranks; the exit status: 0, or the failed rank's (its error printed)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="zoo-launch-") as logs, threads_per_rank(nprocs), quiet_torch():
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=logs))
        try:
            elastic_launch(config, fn)(*args)
            return 0
        except ChildFailedError as err:
            return report_failure(Path(logs), err.failures)
        except SignalException as err:  # Ctrl-C (the ranks were stopped)
            if err.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise


def report_failure(logs: Path, failures: dict) -> int:
    """Print the error of the rank that failed first and return its status.

    A user error (status 2) comes first: once a rank has stopped, its peers fail too, in their next
    collective, and that is not what the user needs to read. A rank that left no record (killed by a
    signal, e.g. by the kernel's out-of-memory killer) is named with its status."""
    records = []
    for file in logs.glob("*/attempt_*/*/error.json"):
        rec = json.loads(file.read_text()).get("zoo")  # written by zoo.cli.report
        if rec:
            records.append((rec["exitcode"] != 2, rec["time"], int(file.parent.name), rec))
    if records:
        rec = min(records, key=lambda r: r[:3])[3]
        print(rec["text"], file=sys.stderr)
        return rec["exitcode"]
    rank, failure = min(failures.items())
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with status {failure.exitcode}"
    print(f"zoo: error: rank {rank} {how}", file=sys.stderr)
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


@contextlib.contextmanager
def threads_per_rank(nprocs: int) -> Iterator[None]:
    """OMP_NUM_THREADS (unless set) = this machine's cores shared out over the ranks, as the ranks inherit it."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nprocs))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """No log lines from torch.distributed's agent (its failure reports and shutdown notices) unless ZOO_DEBUG."""
    if os.environ.get("ZOO_DEBUG", "") not in ("", "0"):
        yield
        return
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
