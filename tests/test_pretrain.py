"""The pretraining job (`examples/pretrain.py`): the README's main-job command does what the README
says, a resumed run continues exactly, and bad flags end with one line naming the flag before
anything is written.

The main job runs as the README writes it (its last command, with no flags), from a scratch
directory (so its outputs land there) with an empty tokenizer cache, no network and no GPU.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
SMALL = ["--steps", "6", "--save-every", "3", "-l", "32", "-b", "2", "--sample-tokens", "0", "--nproc", "1"]


def readme_command() -> list[str]:
    """The last command of the README's main-job block (after the install), split."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- main-job -->\s*```bash\n(.*?)\n```", text, re.S)
    assert block, "README.md has no <!-- main-job --> command block"
    return shlex.split(block.group(1).split("&&")[-1].strip())


def run(argv: list[str], cwd, cache, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHARDFORMER_CACHE=str(cache), **OFFLINE)
    env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    job = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # no stray workers left behind
        os.killpg(job.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(argv, job.returncode, out, err)


def log_rows(save_dir) -> list[dict]:
    with open(os.path.join(save_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tree_digest(path) -> dict:
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = (hashlib.sha256(f.read()).hexdigest(), os.path.getmtime(full))
    return digest


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("main_job")
    command = readme_command()
    assert command[:2] == ["python", "examples/pretrain.py"], command
    began = time.monotonic()
    proc = run([os.path.join(ROOT, command[1]), *command[2:]], cwd, cwd / "cache")
    return cwd, proc, time.monotonic() - began


def test_readme_main_job(main_job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cwd, proc, wall = main_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    print(f"\nmain job: {wall:.1f} s wall; {proc.stdout.strip().splitlines()[-1]!r}")
    assert wall < 180, f"the embedded default took {wall:.0f} s (the README promises under 3 minutes)"
    out = cwd / "runs" / "pretrain"
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 201))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-20:]) / 20
    print(f"loss {first:.3f} -> {last:.3f} (mean of the last 20 steps)")
    assert first > 7.0 and last < first - 1.5, (first, last)  # ln(2048) = 7.62 at the start
    for r in rows:
        assert r["tokens"] == 8 * 128 and r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_memory_gib"] > 0
        assert r["mfu"] is None  # no peak is known for a CPU
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("bpe-2048-") for name in os.listdir(cwd / "cache" / "tokenizers"))
    # the HF checkpoint is the trained model, with its tokenizer, for plain transformers
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert len(tokenizer) == model.config.vocab_size == 2048
    with open(os.path.join(os.path.dirname(os.__file__), "json", "decoder.py")) as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < first - 1.5, loss
    assert "sample from" in proc.stdout
    assert proc.stdout.split("(plain transformers):\n", 1)[1].startswith("def")


def test_resume_continues_exactly(tmp_path):
    """A run resumed from its step-3 checkpoint (as a crash after that save leaves it) trains steps
    4-6 exactly as the uninterrupted run did: losses, gradient norms and final weights (one
    process: the data position, optimizer, scheduler and RNG the script restores; resuming sharded
    state over several ranks is tests/test_resume.py's)."""
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = run([os.path.join(EXAMPLES, "pretrain.py"), *SMALL, "--save-dir", str(whole)], tmp_path, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-6")
    shutil.rmtree(cut / "model")
    (cut / "checkpoints" / "latest").write_text("step-3")
    proc = run([os.path.join(EXAMPLES, "pretrain.py"), *SMALL, "--save-dir", str(cut), "--resume"], tmp_path,
               tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps 4..6" in proc.stdout
    a, b = log_rows(whole), log_rows(cut)  # timing fields differ; the training figures must not
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]
    wa, wb = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def pretrain_main():
    sys.path.insert(0, EXAMPLES)
    try:
        import pretrain
    finally:
        sys.path.remove(EXAMPLES)
    return pretrain.main


def _bert_checkpoint(path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(path)


@pytest.mark.parametrize("case", ["dataset", "bert", "layout", "resume_empty", "save_dir_taken", "resume_other"])
def test_bad_flags_one_line_nothing_written(case, main_job, pretrain_main, tmp_path, capsys, monkeypatch):
    """Each bad flag: status 2, one stderr line naming the flag, no new directory, and an existing
    run's files untouched (checked in this process: the checks run before any process starts)."""
    monkeypatch.setenv("SHARDFORMER_CACHE", str(main_job[0] / "cache"))
    existing = main_job[0] / "runs" / "pretrain"
    fresh = tmp_path / "fresh"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, flag = {
        "dataset": (["-d", str(tmp_path / "missing" / "corpus.txt"), "--save-dir", str(fresh)], "--dataset"),
        "bert": (["-c", str(tmp_path / "bert"), "--save-dir", str(fresh)], "--config"),
        "layout": (["--tp", "3", "--save-dir", str(fresh)], "--tp 3"),
        "resume_empty": (["--resume", "--save-dir", str(empty)], "--resume"),
        "save_dir_taken": (["--save-dir", str(existing)], "--save-dir"),
        "resume_other": (["--resume", "--save-dir", str(existing), "--vocab-size", "1024"], "--resume"),
    }[case]
    if case == "bert":
        _bert_checkpoint(tmp_path / "bert")
    before = tree_digest(existing)
    capsys.readouterr()
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain.py: error: ") and flag in err[0], err
    print(f"\n{case}: {err[0]}")
    assert not fresh.exists() and os.listdir(empty) == []
    assert tree_digest(existing) == before


def test_unknown_config_in_a_fresh_process(tmp_path):
    """The same from the command line: exit status 2, one stderr line, no traceback."""
    proc = run([os.path.join(EXAMPLES, "pretrain.py"), "-c", "99b", "--save-dir", str(tmp_path / "x")], tmp_path,
               tmp_path / "c", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--config '99b'" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
