"""A pool of 2 CPU ranks for tests: gloo over loopback only, a free port, a time limit per job.

Starting a rank (a fresh interpreter, ``import torch``, the process group)
costs seconds, so one pool serves a whole test module: ``pool.run(fn, *args)``
calls ``fn(rank, world_size, *args)`` on every rank with the default process
group initialised, and fails with each failing rank's traceback.  ``fn``
must be a module-level function (the ranks import it by name).  After a
failure or a timeout the ranks may be out of step (one waiting in a
collective the other never reached), so the pool is torn down and the next
job starts a new one.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"


def loopback_env() -> dict:
    """Environment that keeps gloo's own connections on the loopback interface (``lo``, ``lo0``)."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    for name in ("lo", "lo0"):
        if name in names:
            return {"GLOO_SOCKET_IFNAME": name}
    return {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, jobs, results) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), OMP_NUM_THREADS="1", **loopback_env())
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            fn(rank, world_size, *args)
            dist.barrier()
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - reported to the test
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int = 2):
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(target=_serve, args=(r, self.world_size, port, self._jobs[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 90.0) -> None:
        if not self._procs:
            self._start()
        for q in self._jobs:
            q.put((fn, args))
        deadline = time.monotonic() + timeout
        errors = {}
        for _ in range(self.world_size):
            try:
                rank, err = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise TimeoutError(
                    f"{fn.__name__}{args} did not finish on {self.world_size} ranks in {timeout} s"
                    + "".join(f"\n--- rank {r} ---\n{e}" for r, e in errors.items())
                ) from None
            if err is not None:
                errors[rank] = err
                if len(errors) == 1:  # the other rank may be stuck in a collective: give it a moment
                    deadline = min(deadline, time.monotonic() + 10.0)
        if errors:
            self.close()
            raise AssertionError(
                f"{fn.__name__}{args} failed on rank(s) {sorted(errors)}:"
                + "".join(f"\n--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            )

    def close(self) -> None:
        for q, p in zip(self._jobs if self._procs else [], self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
        self._procs = []
