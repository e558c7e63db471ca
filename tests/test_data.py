"""Dataset readers (IDX, CIFAR-10 binary), splits and the shared preprocessing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee.cli import main

HAVE_FMNIST = (D.FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


def write_idx(path: Path, arr: np.ndarray, gz: bool = True, code: int = 0x08) -> Path:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fake_fmnist(d: Path, n_train: int = 40, n_test: int = 10) -> Path:
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return d


# ---- IDX ---------------------------------------------------------------------------------------


def test_idx_roundtrip_gz_and_plain(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        p = write_idx(tmp_path / f"a{gz}.idx", arr, gz=gz)
        got = D.read_idx(p)
        assert got.shape == (2, 3, 4) and got.dtype == np.uint8
        assert np.array_equal(got, arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: b"\x01\x00" + raw[2:], "bad magic"),
        (lambda raw: raw[:2] + b"\x42" + raw[3:], "unknown element type"),
        (lambda raw: raw[:3] + b"\x07" + raw[4:], "dimensions"),
        (lambda raw: raw[:-5], "header says"),
        (lambda raw: raw + b"\x00", "header says"),
        (lambda raw: raw[:4] + b"\x00\x00\x00\x00" + raw[8:], "non-positive"),
        (lambda raw: b"", "bad magic"),
    ],
)
def test_idx_corrupt_headers_fail_clearly(tmp_path: Path, mutate, message: str) -> None:
    arr = np.zeros((3, 4, 4), dtype=np.uint8)
    p = write_idx(tmp_path / "x.idx", arr, gz=False)
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(D.DataError, match=message):
        D.read_idx(p)


def test_a_gzip_bomb_is_read_no_further_than_its_header_says(tmp_path: Path) -> None:
    """A valid header stating 4 bytes of data, then 512 MiB of zeros compressed (about 0.5 MB):
    the reader stops one byte past what the header states and refuses the file, rather than
    inflating it all before looking. Peak RSS of a fresh process reading it, against one reading
    a small file; and a header stating more than MAX_IDX_BYTES is refused from the header."""
    import zlib

    from tests.peak_rss import peak_kib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 24)
    body = packer.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04")
    body += b"".join(packer.compress(zeros) for _ in range(32)) + packer.flush()
    bomb = tmp_path / "bomb-idx1-ubyte.gz"
    bomb.write_bytes(body)
    small = write_idx(tmp_path / "small.gz", np.zeros(4, np.uint8))
    (read, small_kib), (refused, bomb_kib) = (peak_kib("dapdee.data:read_idx", str(p)) for p in (small, bomb))
    assert read == "ok" and refused.startswith("refused") and "header says [4]" in refused, refused
    assert bomb_kib - small_kib < 64 * 1024, (small_kib, bomb_kib)  # inflated, the file is 512 MiB
    bomb.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + (1 << 16).to_bytes(4, "big") * 2))
    with pytest.raises(D.DataError, match="over the"):
        D.read_idx(bomb)  # 4 GiB stated: refused from the header alone


def test_idx_across_gzip_members_reads_as_gzip_does(tmp_path: Path) -> None:
    """A gzipped IDX file of several members (split anywhere, the header included; an empty
    member; zero padding between members) reads as `gzip.decompress` reads it; bytes after the
    last member that are no gzip member are a corrupt stream."""
    arr = (np.arange(60 * 100) % 251).astype(np.uint8).reshape(60, 100)
    raw = b"\x00\x00\x08\x02" + (60).to_bytes(4, "big") + (100).to_bytes(4, "big") + arr.tobytes()
    p = tmp_path / "m.gz"
    for body in (
        gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]),
        gzip.compress(raw[:6]) + gzip.compress(raw[6:]),  # the header split
        gzip.compress(b"") + gzip.compress(raw),
        gzip.compress(raw[:100]) + b"\x00" * 8 + gzip.compress(raw[100:]),
    ):
        p.write_bytes(body)
        assert np.array_equal(D.read_idx(p), arr)
    p.write_bytes(gzip.compress(raw) + b"garbage")
    with pytest.raises(D.DataError, match="corrupt gzip"):
        D.read_idx(p)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    """A truncated stream and a damaged deflate stream (bytes flipped inside it: zlib's own
    error, not an OSError) are both a DataError naming the file."""
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")[:-6])
    with pytest.raises(D.DataError, match="corrupt gzip"):
        D.read_idx(p)
    raw = bytearray(gzip.compress((np.arange(4096) % 7).astype(np.uint8).tobytes()))
    raw[12] ^= 0xFF  # the first byte of the deflate data: "invalid distance too far back"
    p.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match="x.gz.*corrupt gzip"):
        D.read_idx(p)


@needs_fmnist
def test_real_fashion_mnist() -> None:
    x, y = D.read_fashion_mnist(D.FMNIST_DIR, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).tolist() == [1000] * 10  # the t10k split is balanced
    tr, cal = D.load_raw("fashion-mnist", "train")[1], D.load_raw("fashion-mnist", "calib")[1]
    assert len(tr) == 55000 and len(cal) == 5000
    idx_tr, idx_cal = D.split_indices(60000, "train"), D.split_indices(60000, "calib")
    assert not set(idx_tr.tolist()) & set(idx_cal.tolist())  # calibration is never trained on


def test_fake_fmnist_dir_and_corrupt_file(tmp_path: Path) -> None:
    d = write_fake_fmnist(tmp_path / "fm")
    x, y = D.load_raw(f"fashion-mnist:{d}", "test")
    assert x.shape == (10, 1, 28, 28) and len(y) == 10
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abc"))
    with pytest.raises(D.DataError, match="header says"):
        D.load_raw(f"fashion-mnist:{d}", "test")


def test_missing_dataset_messages(tmp_path: Path) -> None:
    # the package's folder missing (a bare `fashion-mnist` reads it): the package to install is named
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        D.load_raw(D.parse_dataset("fashion-mnist", fmnist_dir=tmp_path / "none"), "test")
    with pytest.raises(D.DataError, match="not found"):
        D.load_raw(f"fashion-mnist:{tmp_path}", "test")
    with pytest.raises(D.DataError, match="cifar10:DIR"):
        D.parse_dataset("cifar10")
    with pytest.raises(D.DataError, match="expected fashion-mnist"):
        D.parse_dataset("imagenet")


def test_cli_missing_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "train",
            "zoo:alexnet?width=0.125",
            "--dataset",
            f"cifar10:{tmp_path / 'no'}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not found" in err and "cifar10" in err
    assert not (tmp_path / "o").exists()


# ---- CIFAR-10 binary ---------------------------------------------------------------------------


def write_cifar(d: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    d.mkdir(parents=True, exist_ok=True)
    all_x, all_y = [], []
    for name in (*D.CIFAR_TRAIN, *D.CIFAR_TEST):
        y = rng.integers(0, 10, n, dtype=np.uint8)
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        (d / name).write_bytes(np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tobytes())
        all_x.append(x)
        all_y.append(y)
    return np.concatenate(all_x), np.concatenate(all_y)


def test_cifar_binary_reader(tmp_path: Path) -> None:
    x, y = write_cifar(tmp_path / "c")
    gx, gy = D.read_cifar_bin([tmp_path / "c" / n for n in D.CIFAR_TRAIN])
    assert gx.shape == (20, 3, 32, 32) and np.array_equal(gx, x[:20]) and np.array_equal(gy, y[:20])
    tx, ty = D.load_raw(f"cifar10:{tmp_path / 'c'}", "test")
    assert np.array_equal(tx, x[20:]) and np.array_equal(ty, y[20:])
    # calib is carved from the 20 training records (10 %), disjoint from train
    assert len(D.load_raw(f"cifar10:{tmp_path / 'c'}", "calib")[1]) == 2
    pre = D.default_preprocess(f"cifar10:{tmp_path / 'c'}", (1, 3, 32, 32))
    assert pre["resize"] == "none" and pre["channels"] == "as-is"
    xt, _ = D.load_split(f"cifar10:{tmp_path / 'c'}", "test", (1, 3, 32, 32))
    want = (
        torch.tensor(x[20:], dtype=torch.float32) / 255 - torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    ) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    assert torch.allclose(xt, want, atol=1e-6)


def test_cifar_bad_files(tmp_path: Path) -> None:
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(D.DataError, match="whole number"):
        D.load_raw(f"cifar10:{tmp_path / 'c'}", "test")
    (tmp_path / "c" / "data_batch_3.bin").unlink()
    with pytest.raises(D.DataError, match="binary version"):
        D.load_raw(f"cifar10:{tmp_path / 'c'}", "train")
    rec = bytes([12]) + bytes(3072)
    (tmp_path / "c" / "test_batch.bin").write_bytes(rec)
    with pytest.raises(D.DataError, match="out of range"):
        D.load_raw(f"cifar10:{tmp_path / 'c'}", "test")


# ---- preprocessing -----------------------------------------------------------------------------


def test_pad_and_normalise(tmp_path: Path) -> None:
    d = write_fake_fmnist(tmp_path / "fm")
    ds = f"fashion-mnist:{d}"
    raw, _ = D.load_raw(ds, "test")
    pre = D.default_preprocess(ds, (1, 1, 32, 32))
    assert pre["resize"] == "pad" and pre["channels"] == "as-is"
    x, y = D.load_split(ds, "test", (1, 1, 32, 32), pre)
    assert x.shape == (10, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    m, s = pre["mean"][0], pre["std"][0]
    assert torch.allclose(x[:, :, 2:30, 2:30], (torch.tensor(raw, dtype=torch.float32) / 255 - m) / s, atol=1e-6)
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], -m / s))
    batches = list(D.iter_batches(ds, "test", (1, 1, 32, 32), pre, batch_size=4))
    assert len(batches) == 3 and torch.equal(torch.cat([b[0] for b in batches]), x)


def test_upsample_and_replicate(tmp_path: Path) -> None:
    d = write_fake_fmnist(tmp_path / "fm")
    ds = f"fashion-mnist:{d}"
    pre = D.default_preprocess(ds, (1, 3, 224, 224))
    assert pre["resize"] == "bilinear" and pre["channels"] == "replicate" and len(pre["mean"]) == 3
    assert "replicated" in pre["description"]
    x, _ = D.load_split(ds, "test", (1, 3, 224, 224), pre, limit=2)
    assert x.shape == (2, 3, 224, 224)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    with pytest.raises(D.DataError, match="channels"):
        D.default_preprocess(f"cifar10:{tmp_path}", (1, 1, 32, 32))
    with pytest.raises(D.DataError, match="larger"):
        D.preprocess_images(np.zeros((1, 1, 40, 40), np.uint8), (1, 1, 32, 32), {"resize": "pad"})


def test_frames_are_uint8_at_model_resolution_and_normalise_like_training(tmp_path: Path) -> None:
    """`capture_frames` is what a device ships (1 byte per pixel); `FrameNormalize`, the first
    node of an artifact's graph, turns it into exactly the tensor training used, from uint8 or
    from the float32 pixel levels an edge worker upcasts a UINT8 wire tensor to."""
    d = write_fake_fmnist(tmp_path / "fm")
    ds = f"fashion-mnist:{d}"
    raw, _ = D.load_raw(ds, "test")
    for shape in ((1, 1, 32, 32), (1, 3, 224, 224)):
        pre = D.default_preprocess(ds, shape)
        frames = D.capture_frames(raw, shape, pre)
        assert frames.dtype == torch.uint8 and tuple(frames.shape) == (10, *shape[1:])
        norm = D.FrameNormalize.from_recipe(pre, shape[1])
        x = D.preprocess_images(raw, shape, pre)
        assert torch.equal(norm(frames), x)
        assert torch.equal(norm(frames.to(torch.float32)), x)
    # bilinear upsampling is rounded to the nearest level: within half a level of the exact
    pre = D.default_preprocess(ds, (1, 1, 224, 224))
    exact = torch.nn.functional.interpolate(
        torch.tensor(raw, dtype=torch.float32).reshape(-1, 1, 28, 28),
        size=(224, 224),
        mode="bilinear",
        align_corners=False,
    )
    assert (D.capture_frames(raw, (1, 1, 224, 224), pre).to(torch.float32) - exact).abs().max() <= 0.5
    with pytest.raises(D.DataError, match="uint8"):
        D.capture_frames(np.zeros((1, 28, 28), np.float32), (1, 1, 32, 32), pre)
    with pytest.raises(D.DataError, match="std"):
        D.FrameNormalize(1 / 255, [0.5], [0.0])
