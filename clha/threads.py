"""How many CPU threads each process of a run uses.

Several processes on one machine (`accelerate launch --num_processes 2` on a CPU, or 8 GPU ranks sharing a node's
cores) must split the cores between them: two processes with two OpenMP threads each on two cores spin against
each other and run many times slower. accelerate only sets `OMP_NUM_THREADS=1` when the variable is not already
set, so an exported `OMP_NUM_THREADS` used to win. Every entry point (training, evaluation stages, reward-model
training) therefore calls `configure_threads()` first. It sets torch's intra-op threads (and inter-op threads,
while torch still allows it) to

    max(1, cores available to this process // processes on this machine)

whatever the inherited `OMP_NUM_THREADS`, unless `CLHA_NUM_THREADS=N` asks for N threads per process explicitly.

- cores available: `len(os.sched_getaffinity(0))` (honours taskset / cgroup cpusets), else `os.cpu_count()`;
- processes on this machine: `LOCAL_WORLD_SIZE` (set by torchrun / accelerate launch), else the MPI local size
  variables, else accelerate's state when it is already initialised, else 1.

The choice is logged once (by global rank 0), with a warning when the threads of all local processes exceed the
cores. `OMP_NUM_THREADS` is set to the same number so that child processes agree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from clha.errors import InputError

logger = logging.getLogger(__name__)

ENV_VAR = "CLHA_NUM_THREADS"
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")


@dataclass
class ThreadChoice:
    threads: int            # torch intra-op threads of this process
    cores: int              # cores available to this process
    local_processes: int    # processes of the run on this machine
    explicit: bool          # from CLHA_NUM_THREADS
    inherited_omp: Optional[str]  # OMP_NUM_THREADS as inherited (None: unset)

    def describe(self) -> str:
        how = (f"{ENV_VAR}={self.threads}" if self.explicit
               else f"{self.cores} core(s) // {self.local_processes} local process(es)")
        omp = "" if self.inherited_omp is None or self.explicit else f"; inherited OMP_NUM_THREADS={self.inherited_omp} ignored"
        return f"torch threads per process: {self.threads} ({how}{omp})"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # not on Linux
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this run on this machine (1 when not launched as several processes)."""
    for name in LOCAL_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.strip().isdigit() and int(value) > 0:
            return int(value)
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:          # only when already initialised; never start a process group here
            return max(1, int(PartialState().num_processes))
    except Exception:  # noqa: BLE001 - accelerate missing or not initialised: a single process
        pass
    return 1


def requested_threads() -> Optional[int]:
    """CLHA_NUM_THREADS as a positive integer, None when unset or empty; InputError otherwise."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"must be a positive integer (threads per process), got {value!r}", field=ENV_VAR)
    return int(value)


def choose_threads() -> ThreadChoice:
    cores, local = available_cores(), local_processes()
    explicit = requested_threads()
    threads = explicit if explicit is not None else max(1, cores // local)
    return ThreadChoice(threads, cores, local, explicit is not None, os.environ.get("OMP_NUM_THREADS"))


def configure_threads(exit_on_error: bool = True) -> ThreadChoice:
    """Set this process's torch threads (see the module docstring); returns the choice.

    A bad CLHA_NUM_THREADS prints one `error:` line and exits with status 2 (`exit_on_error=False`: raises
    InputError instead)."""
    import torch

    try:
        choice = choose_threads()
    except InputError as err:
        if not exit_on_error:
            raise
        import sys

        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:    # only allowed before the first inter-op parallel work; then torch keeps its own
        pass
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    if os.environ.get("RANK", "0") == "0":
        logger.info(choice.describe())
        if choice.threads * choice.local_processes > choice.cores:
            advice = (f"unset {ENV_VAR} to split the cores between the processes" if choice.explicit
                      else "use fewer processes")
            logger.warning("%d local process(es) x %d thread(s) exceed the %d core(s) available: the threads will "
                           "compete for cores (%s)", choice.local_processes, choice.threads, choice.cores, advice)
    return choice
