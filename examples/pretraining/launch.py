"""Starts `examples/pretrain.py`'s worker processes on this machine, as torchrun would (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT in their environment), so that the job runs
with plain `python` and a failing worker ends the job with its one-line error and no launcher
traceback. If one worker exits with an error, the others are stopped; Ctrl-C stops them all.
Under `torchrun` this module is not used.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

WORKER_ENV = "LOCAL_RANK"  # set for workers, by this launcher or by torchrun


def is_worker() -> bool:
    return WORKER_ENV in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def launch(script: str, argv: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str,
           master_port: int | None) -> int:
    """Run `nproc` workers of `script argv`; returns the job's exit status (the first failure's)."""
    port = master_port or (free_port() if nnodes == 1 else 29500)
    world = nproc * nnodes
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for local in range(nproc):
        env = dict(os.environ, RANK=str(node_rank * nproc + local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank), MASTER_ADDR=master_addr,
                   MASTER_PORT=str(port), OMP_NUM_THREADS=threads)
        procs.append(subprocess.Popen([sys.executable, script, *argv], env=env))

    def stop(signum=None, frame=None):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)
    try:
        status = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not status:
                status = failed[0]
                stop()
                deadline = time.monotonic() + 30
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        for rank, p in enumerate(procs):
            if p.returncode is not None and p.returncode < 0 and p.returncode != -signal.SIGTERM:
                name = signal.Signals(-p.returncode).name
                hint = " (out of memory?)" if p.returncode == -signal.SIGKILL else ""
                print(f"pretrain.py: error: worker {node_rank * nproc + rank} was killed by {name}{hint}",
                      file=sys.stderr, flush=True)
        failed = [p.returncode for p in procs if p.returncode]
        killed = [p.returncode for p in procs if p.returncode is not None and p.returncode < 0
                  and p.returncode != -signal.SIGTERM]
        return killed[0] if killed else (status or (failed[0] if failed else 0))
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
