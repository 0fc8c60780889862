"""Run test functions on N gloo processes that are spawned once and reused for many checks.

    pool = ProcessPool(4)
    results = pool.run(check_fn, arg)   # check_fn(*args) on every rank; list of return values

A worker that raises makes `run` raise with the rank's traceback. A rank that fails between
collectives can leave the others waiting: `run` then times out, the pool is torn down, and the
next `run` on it starts a fresh one. A worker whose parent is gone (the test run was killed)
exits instead of lingering.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, parent: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the test run is gone
                os._exit(0)
            continue
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ProcessPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.procs = []

    def _start(self):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        self.procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self.tasks[r], self.results, os.getpid()),
                        daemon=True)
            for r in range(self.world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 300, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results in rank order."""
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = {}, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                (out.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
                if errors:
                    break
        except queue.Empty:
            self.close()
            raise TimeoutError(f"{fn.__name__} did not finish on {self.world_size} ranks in {timeout}s")
        if errors:
            self.close()  # the other ranks may be stuck in a collective
            raise AssertionError("\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def close(self):
        for q in getattr(self, "tasks", []):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []
