"""Data for `examples/pretrain.py`: the corpus, the tokenizer, and packed fixed-length sequences.

* Corpus: an HF dataset name, local text / JSONL files, or (the default) this Python's standard
  library source files. All go through `datasets` in streaming mode (nothing is converted or
  cached on disk; a large corpus is read as it is consumed), split over the data-parallel ranks
  with `split_dataset_by_node` (each dp rank reads its own part; the tp / sp / pp ranks of one
  replica read the same part, as the batch rule asks).
* Tokenizer: an HF tokenizer when one is named (or comes with the --config checkpoint), else a
  byte-level BPE trained with `tokenizers` on the first few MB of the corpus on first use and
  cached under ~/.cache/shardformer/tokenizers (keyed by the corpus and the vocabulary size).
* Packing: documents are tokenized, each followed by the end-of-text token, concatenated and cut
  into sequences of exactly --seq-len tokens, each row of a batch from its own lane of documents;
  local files are read in an order shuffled by --seed. `state_dict()` (the dataset's position
  plus the tokens already read but not yet used) lets a resumed run continue with the next batch.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import os
import random
import sysconfig

from .cli import UsageError, is_local

EOS = "<|endoftext|>"
BPE_SAMPLE_BYTES = 4 << 20  # the BPE is trained on this much of the corpus
_TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".py", ".md")


def stdlib_files() -> list[str]:
    """The standard library's own .py files (tests, IDLE and installed packages left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep, os.sep + "tests" + os.sep, "idlelib")
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if not any(s in f for s in skip))
    if not files:
        raise UsageError(f"--dataset (default): no Python source files found under {root}; pass -d/--dataset")
    return files


def local_files(spec: str) -> list[str]:
    """The files a --dataset path, folder or glob names (comma separated), sorted."""
    files: list[str] = []
    for part in spec.split(","):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            found = [f for f in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                     if os.path.isfile(f) and f.endswith(_TEXT_SUFFIXES)]
            if not found:
                raise UsageError(f"--dataset {part!r}: the folder holds no {' / '.join(_TEXT_SUFFIXES)} files")
            files += sorted(found)
        elif os.path.isfile(part):
            files.append(part)
        elif any(c in part for c in "*?") and glob.glob(part):
            files += sorted(glob.glob(part))
        else:
            raise UsageError(f"--dataset {part!r}: no such file or directory")
    return files


class Corpus:
    """Where the text comes from: `files` (local, with their `builder` "text" or "json") or an HF
    dataset `name`."""

    def __init__(self, args):
        self.text_field, self.seed = args.text_field, args.seed
        self.name = self.config_name = None
        if args.dataset is None:
            self.files, self.builder, self.label = stdlib_files(), "text", "the Python standard library's source"
        elif is_local(args.dataset):
            self.files = local_files(args.dataset)
            jsonl = [f.endswith((".json", ".jsonl")) for f in self.files]
            if any(jsonl) and not all(jsonl):
                raise UsageError(f"--dataset {args.dataset!r}: mixes JSON and text files; pass one kind")
            count = f"{len(self.files)} local file{'s' if len(self.files) > 1 else ''}"
            self.builder, self.label = ("json" if all(jsonl) else "text"), count
        else:
            self.files, self.builder, self.name, self.config_name = None, None, args.dataset, args.dataset_config
            self.label = f"the HF dataset {args.dataset!r}"

    def stream(self):
        """An `IterableDataset` of {text_field: str} records (one per document)."""
        import datasets

        datasets.disable_progress_bars()
        if self.files is not None:
            files = list(self.files)
            random.Random(self.seed).shuffle(files)  # the same order on every rank and on resume
            if self.builder == "text":
                ds = datasets.load_dataset("text", data_files=files, sample_by="document", streaming=True,
                                           split="train")
                return ds.rename_column("text", self.text_field) if self.text_field != "text" else ds
            return datasets.load_dataset("json", data_files=files, streaming=True, split="train")
        try:
            return datasets.load_dataset(self.name, self.config_name, streaming=True, split="train")
        except Exception as e:  # noqa: BLE001 - one line for the user
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--dataset {self.name!r}: not a local path and not loadable as an HF dataset "
                             f"({reason})") from None

    def check(self) -> None:
        """UsageError unless the first record has a string --text-field."""
        first = next(iter(self.stream()), None)
        if first is None:
            raise UsageError(f"--dataset: {self.label} holds no records")
        if not isinstance(first.get(self.text_field), str):
            raise UsageError(f"--text-field {self.text_field!r}: the records of {self.label} have the fields "
                             f"{sorted(first)}")

    def key(self) -> str:
        """Identifies the corpus for the tokenizer cache."""
        if self.files is not None:
            parts = [f"{f}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in sorted(self.files)]
        else:
            parts = [self.name, str(self.config_name)]
        return hashlib.sha256("\n".join(parts + [self.text_field]).encode()).hexdigest()[:16]

    def sample_texts(self, limit: int = BPE_SAMPLE_BYTES):
        """The first `limit` bytes of text, document by document (for training the BPE)."""
        seen = 0
        for record in self.stream():
            text = record[self.text_field]
            yield text
            seen += len(text)
            if seen >= limit:
                return


def cache_dir() -> str:
    root = os.environ.get("SHARDFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardformer")
    return os.path.join(root, "tokenizers")


def train_bpe(corpus: Corpus, vocab_size: int) -> tuple[str, bool]:
    """A byte-level BPE's JSON for `corpus`, trained on first use and cached; (json, from cache)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(cache_dir(), f"bpe-{vocab_size}-{corpus.key()}.json")
    if os.path.exists(path):
        with open(path) as f:
            return f.read(), True
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus.sample_texts(), trainer)
    text = tokenizer.to_str()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: concurrent first runs do not read half a file
    return text, False


def hf_tokenizer(source):
    """An HF fast tokenizer from a path / id, or from a trained BPE's JSON (`source` = ("json", text))."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if isinstance(source, tuple):
        from tokenizers import Tokenizer

        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(source[1]), bos_token=EOS, eos_token=EOS)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - one line for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--tokenizer {source!r}: cannot load an HF tokenizer ({reason})") from None


def tokenizer_source(args, corpus: Corpus, has_checkpoint: bool):
    """What `hf_tokenizer` should load: --tokenizer, the --config checkpoint's, or a trained BPE."""
    if args.tokenizer:
        return args.tokenizer
    if has_checkpoint and any(os.path.exists(os.path.join(args.config, f)) for f in ("tokenizer.json",
                                                                                         "tokenizer_config.json")):
        return args.config
    return ("json", train_bpe(corpus, args.vocab_size)[0])


class PackedBatches:
    """[batch, seq_len] token-id batches from this dp rank's part of `corpus`, epoch after epoch.
    Each row of the batch is its own lane: a lane holds the rest of the documents it drew, so one
    batch mixes about `batch` documents instead of cutting one long file into all its rows."""

    def __init__(self, corpus: Corpus, tokenizer, seq_len: int, batch: int, dp_rank: int, dp_size: int):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(corpus.stream(), rank=dp_rank, world_size=dp_size)
        self.field, self.tokenizer, self.eos = corpus.text_field, tokenizer, tokenizer.eos_token_id
        self.seq_len, self.batch = seq_len, batch
        self.lanes: list[list[int]] = [[] for _ in range(batch)]
        self.position = copy.deepcopy(self.dataset.state_dict())  # after the last document read
        self.epoch = 0

    def _documents(self):
        idle = 0  # passes in a row that yielded nothing (one may follow a resume at an epoch's end)
        while idle < 2:
            self.dataset.set_epoch(self.epoch)
            idle += 1
            for record in self.dataset:
                idle = 0
                yield record[self.field]
            self.epoch += 1  # set_epoch(e + 1) starts the next pass from the beginning
        raise ValueError("--dataset: this data-parallel rank's part of the corpus is empty (fewer documents than "
                         "data-parallel ranks?)")

    def __iter__(self):
        import torch

        documents = self._documents()
        while True:
            rows = []
            for lane in self.lanes:
                while len(lane) < self.seq_len:
                    lane.extend(self.tokenizer(next(documents), add_special_tokens=False)["input_ids"] + [self.eos])
                    self.position = copy.deepcopy(self.dataset.state_dict())
                rows.append(lane[:self.seq_len])
                del lane[:self.seq_len]
            yield torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"dataset": copy.deepcopy(self.position), "lanes": [list(lane) for lane in self.lanes],
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.lanes, self.epoch = [list(lane) for lane in state["lanes"]], state["epoch"]
        self.position = state["dataset"]
