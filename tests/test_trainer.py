"""`transformers.Trainer` on a sharded model (`shardformer.hf_trainer.ShardedTrainer`), through the
fine-tuning example (`examples/finetune_hf_trainer.py`).

Every run trains the example's tiny LLaMA for 20 steps on a small local text (a vocabulary of 301
that tp 2 pads), fp32, AdamW with eps 1e-4 (see test_equivalence.ADAMW), `max_grad_norm` 0.5 (below
every step's norm: clipping is active throughout), 4 sequences of 32 tokens per optimizer step in
all. The oracle is the stock script (`--unsharded`: `transformers.Trainer` on the unsharded model,
DDP over the processes): each layout's loss curve (every step's logged loss and gradient norm) and
saved weights equal it within 1e-5 relative. Runs that must start the way a user starts them are
launched with torchrun; the others run the example's `main` on the session's gloo process pools.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT = os.path.join(EXAMPLES, "finetune_hf_trainer.py")
COMMON = ["--vocab-size", "301", "--steps", "20", "--block-size", "32", "--eval-blocks", "8", "--max-grad-norm", "0.5",
          "--lr", "1e-3", "--adam-eps", "1e-4", "--warmup-steps", "2"]
MAX_GRAD_NORM = 0.5
TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch directory with the corpus (a few standard-library modules) and a tokenizer cache."""
    path = tmp_path_factory.mktemp("trainer")
    stdlib = os.path.dirname(os.__file__)
    with open(path / "corpus.txt", "w") as out:
        for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py"):
            with open(os.path.join(stdlib, name)) as f:
                out.write(f.read())
    return path


def _argv(work, out, *flags) -> list[str]:
    return ["-d", str(work / "corpus.txt"), *COMMON, "--output-dir", str(out), *flags]


def launch(work, nproc: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The example as a user starts it: plain python for one process, torchrun for several."""
    env = dict(os.environ, SHARDFORMER_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        command = [sys.executable, SCRIPT, *argv]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(port), SCRIPT, *argv]
    job = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # no stray workers left behind
        os.killpg(job.pid, signal.SIGKILL)
        raise
    assert job.returncode == 0, (out[-2000:], err[-4000:])
    return subprocess.CompletedProcess(command, job.returncode, out, err)


def _example_main(argv: list[str], cache: str) -> dict:
    """On every rank of a pool: the example's `main(argv)` (its tokenizer cache: `cache`)."""
    previous = os.environ.get("SHARDFORMER_CACHE")
    os.environ["SHARDFORMER_CACHE"] = cache
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    try:
        import finetune_hf_trainer

        return finetune_hf_trainer.main(argv)
    finally:
        if previous is None:
            os.environ.pop("SHARDFORMER_CACHE", None)
        else:
            os.environ["SHARDFORMER_CACHE"] = previous


def in_pool(pools, work, nproc: int, argv: list[str]) -> dict:
    """The example on `nproc` ranks of the session's pool; rank 0's summary."""
    summary = pools(nproc).run(_example_main, argv, str(work / "cache"), timeout=300)[0]
    print(f"\n{os.path.basename(summary['model'])} on {nproc} ranks: transformers {summary['transformers']}")
    return summary


def curve(run_dir) -> list[tuple[int, float, float]]:
    """(step, logged loss, logged gradient norm) of every step of a finished run."""
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [(row["step"], row["loss"], row["grad_norm"]) for row in history if "loss" in row]


def eval_loss(run_dir) -> float:
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        return [row["eval_loss"] for row in json.load(f)["log_history"] if "eval_loss" in row][-1]


def weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def compare_runs(run, ref, steps=range(1, 21)) -> dict[str, float]:
    """Max relative differences of `run` to `ref`: loss and gradient norm over `steps`, the final
    weights (each tensor's max |diff| / max |ref|), the final eval loss; asserts each within TOL."""
    a = {s: (loss, norm) for s, loss, norm in curve(run)}
    b = {s: (loss, norm) for s, loss, norm in curve(ref)}
    assert all(s in a and s in b for s in steps), (sorted(a), sorted(b))
    wa, wb = weights(run), weights(ref)
    assert wa.keys() == wb.keys()
    errs = {"loss": max(rel(a[s][0], b[s][0]) for s in steps),
            "grad_norm": max(rel(a[s][1], b[s][1]) for s in steps),
            "weights": max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max()).item() for k in wb),
            "eval_loss": rel(eval_loss(run), eval_loss(ref))}
    figures = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
    print(f"\n{os.path.basename(run)} vs {os.path.basename(ref)}: {figures}")
    assert all(v <= TOL for v in errs.values()), errs
    return errs


@pytest.fixture(scope="module")
def reference(work):
    """The stock script, one process, the unsharded model: the oracle (checkpoints at 10 and 20)."""
    out = work / "reference"
    launch(work, 1, _argv(work, out, "--unsharded", "--batch-size", "4", "--save-steps", "10"))
    return out


@pytest.fixture(scope="module")
def tp2(work):
    """The example at tp 2 on two torchrun processes (checkpoints at 10 and 20)."""
    out = work / "tp2"
    proc = launch(work, 2, _argv(work, out, "--tp", "2", "--batch-size", "4", "--save-steps", "10"))
    summary = json.loads(proc.stdout.split("finetune_hf_trainer: ", 1)[1].splitlines()[0])
    print(f"\ntp 2 run: transformers {summary['transformers']}, loss {summary['first_loss']:.4f} -> "
          f"{summary['last_loss']:.4f}")
    assert summary["steps"] == 20 and summary["last_loss"] < summary["first_loss"], summary
    return out


def test_tp2_equals_tp1(reference, tp2):
    """1. The example at tp 2 (two processes) and at tp 1 (the stock script, one process): the same
    loss curve and gradient norms with clipping active, the same eval loss and saved weights."""
    assert all(norm > MAX_GRAD_NORM for _, _, norm in curve(reference)), "clipping must be active on every step"
    compare_runs(tp2, reference)


def test_tp2_dp2_equals_unsharded_dp4(pools, work, reference):
    """2. tp2 x dp2 on four processes equals dp 4 under the stock Trainer with the unsharded model
    (DDP through accelerate): the same 4 sequences a step, read by 2 replicas or 4 processes."""
    sharded = in_pool(pools, work, 4, _argv(work, work / "tp2dp2", "--tp", "2", "--batch-size", "2"))
    stock = in_pool(pools, work, 4, _argv(work, work / "dp4", "--unsharded", "--batch-size", "1"))
    assert sharded["steps"] == stock["steps"] == 20
    compare_runs(work / "tp2dp2", work / "dp4")
    compare_runs(work / "tp2dp2", reference)


@pytest.fixture(scope="module")
def zero2(pools, work):
    """ZeRO-2 through the Trainer on two ranks (dp 2), 2 accumulated micro-batches of 1 sequence per
    rank, checkpoints at 10 and 20; its flags."""
    flags = ["--zero", "2", "--batch-size", "1", "--grad-accum", "2", "--save-steps", "10"]
    summary = in_pool(pools, work, 2, _argv(work, work / "zero2", *flags))
    assert summary["optimizer"] == "ZeroOptimizer", summary
    return work / "zero2", flags


@pytest.mark.parametrize("layout", ["tp2", "zero2"])
def test_resume_from_checkpoint_reproduces(request, pools, work, layout):
    """3. Resuming from the Trainer's step-10 checkpoint (model, every rank's optimizer state:
    tensor-parallel shards, or sf.ZeroOptimizer's pieces and master weights; the scheduler, the
    RNG states) reproduces steps 11-20 and the final weights."""
    if layout == "tp2":
        run, flags = request.getfixturevalue("tp2"), ["--tp", "2", "--batch-size", "4", "--save-steps", "10"]
    else:
        run, flags = request.getfixturevalue("zero2")
    cut = work / f"{layout}-resumed"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoint-20")
    for name in ("model.safetensors", "trainer_state.json"):
        os.remove(cut / name)
    written = os.path.getmtime(cut / "checkpoint-10" / "trainer_state.json")
    summary = in_pool(pools, work, 2, _argv(work, cut, *flags, "--resume", str(cut / "checkpoint-10")))
    assert summary["steps"] == 20
    # it trained steps 11-20 only: a run from scratch (same seed, same curve) would rewrite checkpoint-10
    assert os.path.getmtime(cut / "checkpoint-10" / "trainer_state.json") == written
    assert (cut / "checkpoint-20" / "trainer_state.json").exists()
    errs = compare_runs(cut, run, steps=range(11, 21))
    assert errs["loss"] == errs["weights"] == 0.0, errs  # same layout, same operations: bit for bit


def test_checkpoint_loads_with_from_pretrained(reference, tp2):
    """4. A checkpoint the Trainer saved from tp 2 is a plain HF directory: `from_pretrained` loads
    it with no missing, unexpected or mismatched tensor, with its tokenizer, and it holds the
    unsharded run's step-10 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = tp2 / "checkpoint-10"
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.vocab_size == len(tokenizer) == 301
    ref = AutoModelForCausalLM.from_pretrained(reference / "checkpoint-10")
    state, ref_state = model.state_dict(), ref.state_dict()
    worst = max(((state[k] - ref_state[k]).abs().max() / ref_state[k].abs().max()).item() for k in ref_state)
    assert worst <= TOL, worst
    ids = tokenizer("def f(x):\n    return x\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_zero2_equals_plain_run(zero2, reference):
    """5. ZeRO stage 2 through the Trainer (the optimizer it builds wrapped in sf.ZeroOptimizer; dp 2,
    2 accumulated micro-batches of 1 sequence per rank: the reducer's reduce-scatter deferred by
    the Trainer's no_sync) equals the plain run."""
    compare_runs(zero2[0], reference)


def test_zero3_equals_plain_run(pools, work, reference):
    """ZeRO stage 3 (FSDP2) through the Trainer, dp 2 with 2 sequences each, equals the plain run."""
    summary = in_pool(pools, work, 2, _argv(work, work / "zero3", "--zero", "3", "--batch-size", "2"))
    assert summary["optimizer"] == "ZeroOptimizer", summary
    compare_runs(work / "zero3", reference)


def test_sequence_parallel_equals_plain_run(pools, work, reference):
    """Ulysses sequence parallelism (sp 2, both ranks one replica reading the same batches) equals
    the plain run."""
    in_pool(pools, work, 2, _argv(work, work / "sp2", "--sp", "2", "--sp-mode", "all_to_all", "--batch-size", "4"))
    compare_runs(work / "sp2", reference)


def _predict(output_dir: str) -> list:
    """On every rank of a pool of 4: `predict` of the tiny test LLaMA at tp2 x dp2 on 6 sequences
    (dp 2 x 2 per batch: the last batch is uneven) against the unsharded model's logits and loss."""
    from datasets import Dataset
    from transformers import TrainingArguments

    import shardformer as sf
    from shardformer.hf_trainer import ShardedTrainer

    from .models import batch, build, rel_err

    ref, model = build("llama"), build("llama")
    model = sf.shard_model(model, config=sf.ShardConfig(tp_size=2))
    ids, labels = batch(6)
    args = TrainingArguments(output_dir=output_dir, per_device_eval_batch_size=2, use_cpu=True, report_to="none",
                             disable_tqdm=True)
    trainer = ShardedTrainer(model=model, args=args, compute_metrics=lambda p: {"rows": float(len(p.predictions))})
    out = trainer.predict(Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}))
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=labels)
    return [out.predictions.shape, rel_err(torch.from_numpy(out.predictions), expected.logits),
            rel(out.metrics["test_loss"], expected.loss.item()), out.metrics["test_rows"]]


def test_predict_gathers_whole_logits(pools, tmp_path):
    """Evaluation with `compute_metrics` at tp2 x dp2: every sequence once, in order, with its
    full-vocabulary logits (gathered over tp), and the unsharded model's loss."""
    for shape, logits_err, loss_err, rows in pools(4).run(_predict, str(tmp_path), timeout=300):
        assert tuple(shape) == (6, 12, 250) and rows == 6, (shape, rows)
        assert logits_err <= TOL and loss_err <= TOL, (logits_err, loss_err)


def test_refuses_what_it_cannot_train():
    """A model not from sf.shard_model, or a pipelined one: ValueError before anything runs."""
    from types import SimpleNamespace

    import shardformer as sf
    from shardformer.hf_trainer import ShardedTrainer

    from .models import build

    with pytest.raises(ValueError, match="sf.shard_model"):
        ShardedTrainer(model=build("llama"))
    with pytest.raises(ValueError, match="ShardConfig.pp_size=2"):
        ShardedTrainer(model=SimpleNamespace(sf_config=sf.ShardConfig(pp_size=2)))


def _bad_batch_on_one_rank(output_dir: str) -> list:
    """On both ranks of a pool of 2 (tp 2: one replica): one training step whose batch is bad on
    rank 1 only, each caught: a label outside the vocabulary (with check_batch=False, so that the
    range check alone must catch it), then input ids differing from rank 0's; then a good step.
    Returns the two messages, the good step's loss and the model's flag afterwards."""
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import TrainingArguments

    import shardformer as sf
    from shardformer.hf_trainer import ShardedTrainer

    from .models import batch, build

    rank = dist.get_rank()

    def train(model, ids, labels):
        args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                                 report_to="none", disable_tqdm=True, save_strategy="no", logging_strategy="no")
        data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
        return ShardedTrainer(model=model, args=args, train_dataset=data).train()

    messages = []
    for corrupt, check in (("labels", False), ("input_ids", True)):
        model = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2, check_batch=check))
        ids, labels = batch(2)
        if rank == 1 and corrupt == "labels":
            labels[1, 5] = 250  # == vocab_size: out of range, on rank 1 only
        elif rank == 1:
            ids[0, 4] = ids[0, 4] % 249 + 1  # another in-range id: rank 1's batch differs from its tp peer's
        with pytest.raises(ValueError) as info:
            train(model, ids, labels)
        messages.append(str(info.value))
    loss = train(model, *batch(2)).training_loss  # the ranks are still in step: a good batch trains
    return [messages, loss, model.sf_batch_checked]


def test_bad_batch_on_one_rank_raises_on_every_rank(pools, tmp_path):
    """The Trainer's training step validates its batch on every rank in one exchange over the
    world (as model.forward_backward does): a label outside the vocabulary, or input ids that
    differ from the tp peer's, on ONE rank raises ValueError on BOTH ranks naming the problem
    (before, the bad-label rank failed alone and the other waited for the process group's
    timeout); the next, good step trains on both."""
    results = pools(2).run(_bad_batch_on_one_rank, str(tmp_path), timeout=120)
    for (bad_label, bad_ids), loss, checked in results:
        assert "ShardedTrainer.training_step: labels outside [0, model.config.vocab_size=250)" in bad_label, bad_label
        assert "ShardedTrainer.training_step" in bad_ids and "received different batches" in bad_ids, bad_ids
        assert torch.isfinite(torch.tensor(loss)) and checked is False, (loss, checked)
    assert results[0][1] == results[1][1], [r[1] for r in results]
