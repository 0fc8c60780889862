"""Resumable training state (`sf.save_checkpoint` / `sf.load_checkpoint`) with real process kills:
a torchrun job killed after step 3 resumes and steps 4-6 equal the uninterrupted run; a save
killed part-way leaves the previous checkpoint in use."""
import os
import signal
import subprocess
import sys

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_job.py")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), JOB, "--out", str(out), *flags]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # no stray workers left behind
        os.killpg(job.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)


def _losses(out):
    with open(os.path.join(out, "losses.txt")) as f:
        return [line.split() for line in f]


def test_killed_run_resumes_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    assert _run(whole).returncode == 0
    killed = _run(cut, "--die-after", "3")
    assert killed.returncode != 0  # the processes were killed
    assert [row[0] for row in _losses(cut)] == ["1", "2", "3"]
    resumed = _run(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(cut) == _losses(whole)  # steps 4-6 too: same losses and RNG draws, to 10 digits


def test_save_killed_part_way_keeps_the_previous_checkpoint(tmp_path):
    import shardformer as sf

    out = tmp_path / "run"
    out.mkdir()
    killed = _run(out, "--die-in-save", "5")
    assert killed.returncode != 0
    ckpt = os.path.join(out, "ckpt")
    assert sf.checkpoint.latest_checkpoint(ckpt).endswith("step-4")
    assert os.path.isdir(os.path.join(ckpt, "step-5.partial"))
    resumed = _run(out, "--resume")  # from step 4: steps 5 and 6 again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [row[0] for row in _losses(out)]
    assert steps == ["1", "2", "3", "4", "5", "5", "6"], steps
    rows = _losses(out)
    assert rows[4] == rows[5]  # step 5 redone from step 4's checkpoint gives the same loss


def test_resume_from_an_empty_directory_is_one_error(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    failed = _run(out, "--resume")
    assert failed.returncode != 0 and "no committed checkpoint" in failed.stderr
