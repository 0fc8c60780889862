"""The GPU tests' own code, run on the CPU against the mocked extension (SHARDFORMER_GPU_TESTS_ON_CPU=1):
a lent GPU session is short, and a bug in a test (a wrong shape, a tensor passed twice into an
autograd.Function under torch.compile, a wrong call) must not be found there. The kernels' results
are only checked on a GPU; this checks the wiring around them."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_test_file_runs_against_the_mocked_extension():
    env = dict(os.environ, SHARDFORMER_GPU_TESTS_ON_CPU="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "tests/test_kernels_gpu.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
