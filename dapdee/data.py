"""Offline image datasets and the one preprocessing path every consumer shares.

Sources (nothing is downloaded, nothing is unpickled):

- ``fashion-mnist`` — gzipped (or plain) IDX files of Debian's ``dataset-fashion-mnist``
  package in ``/usr/share/datasets/fashion-mnist`` (``fashion-mnist:DIR`` reads another dir).
- ``cifar10:DIR`` — CIFAR-10's *binary* version (``data_batch_{1..5}.bin``, ``test_batch.bin``;
  records of 1 label byte + 3072 pixel bytes, channel-planar RGB 32x32).
- ``folder:DIR`` — a user's image folder, ``DIR/<class>/<image>`` (see ``dapdee.imagefolder``).

Splits: ``train`` and ``calib`` are carved from the source's training set by a fixed
permutation (seed ``SPLIT_SEED``, independent of the training seed), so the calibration split
is never trained on; ``test`` is the source's test set (t10k / test_batch), never trained on.
A folder's test set, whose files come in class order, is put through a fixed permutation too
(seed ``TEST_SEED``), so that a ``limit`` samples every class; the built-in datasets' test
sets keep their own order.

Preprocessing (:func:`preprocess_images`) is described by a JSON-able dict stored in every
artifact's manifest, so training, ``eval``, ``calibrate`` and the device client turn raw
uint8 images into tensors the same way.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dapdee.costgraph import is_finite_number

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = ("test_batch.bin",)
CIFAR_RECORD = 1 + 3 * 32 * 32
SPLITS = ("train", "calib", "test")
SPLIT_SEED = 20250291
TEST_SEED = SPLIT_SEED + 1  # the fixed order of a folder's test set
CALIB_SIZE = 5000
NORM = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}
FMNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MAX_IDX_BYTES = 1 << 30  # an IDX file stating more data is refused (Fashion-MNIST's largest: 47 MB)
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset that is missing, malformed or cannot serve the request; the message says why."""


# ---- readers -------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if it starts with the gzip magic).

    Validates the header: two zero bytes, a known type code, 1-4 dimensions, every dimension
    positive, at most MAX_IDX_BYTES of data, and a payload of exactly prod(dims) items. A gzipped
    file is decompressed no further than its header says it holds (a small file cannot inflate
    into gigabytes before the check). O(file size)."""
    path = Path(path)
    try:
        raw: bytes | bytearray = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {str(path)!r} not found") from None
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip_idx(raw, path)
    dtype, dims, head = _idx_header(raw, path)
    want = math.prod(dims) * dtype.itemsize
    if len(raw) - head != want:
        raise DataError(
            f"IDX file {str(path)!r}: header says {list(dims)} ({want} bytes of data), file has {len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_header(raw: bytes | bytearray, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(element type, dims, header length) of the IDX bytes `raw` (its start at least);
    DataError naming what is wrong. O(1)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"IDX file {str(path)!r}: bad magic {raw[:4].hex() or '(empty)'} (expected 0000TTNN)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DataError(f"IDX file {str(path)!r}: unknown element type 0x{code:02x}")
    if not 1 <= ndim <= 4:
        raise DataError(f"IDX file {str(path)!r}: {ndim} dimensions (expected 1-4)")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"IDX file {str(path)!r}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d <= 0 for d in dims):
        raise DataError(f"IDX file {str(path)!r}: non-positive dimension in {list(dims)}")
    dtype = np.dtype(IDX_DTYPES[code])
    if math.prod(dims) * dtype.itemsize > MAX_IDX_BYTES:
        raise DataError(f"IDX file {str(path)!r}: header says {list(dims)}, over the {MAX_IDX_BYTES} bytes read")
    return dtype, dims, head


def _gunzip_idx(raw: bytes, path: Path) -> bytearray:
    """The gzipped IDX file `raw` decompressed up to what its header states, and one byte more
    (so a longer payload still shows), across gzip members as `gzip.decompress` reads them (zero
    padding between them allowed); DataError for a damaged stream or a bad header.
    O(stated size)."""
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    out, rest = bytearray(), raw

    def upto(n: int) -> None:
        nonlocal inflater, rest
        while len(out) < n:
            if inflater.eof:  # the member ended: another may follow
                rest = inflater.unused_data.lstrip(b"\0")
                if not rest:
                    return
                inflater = zlib.decompressobj(wbits=31)
            got = inflater.decompress(rest, n - len(out))
            rest = inflater.unconsumed_tail
            out.extend(got)
            if not got and not rest and not inflater.eof:
                return

    try:
        upto(4)
        upto(4 + 4 * (out[3] if len(out) >= 4 else 0))
        dtype, dims, head = _idx_header(bytes(out), path)
        stated = head + math.prod(dims) * dtype.itemsize
        upto(stated + 1)
    except zlib.error as exc:  # a damaged deflate stream
        raise DataError(f"IDX file {str(path)!r}: corrupt gzip stream ({exc})") from None
    if len(out) <= stated and not inflater.eof:
        raise DataError(f"IDX file {str(path)!r}: corrupt gzip stream (it ends early)")
    return out


def _idx_path(directory: Path, stem: str, installed: Path = FMNIST_DIR) -> Path:
    """The IDX file `stem`(.gz) of `directory`; DataError saying how to get it (the package's
    name when `directory` is where the package installs it, `installed`)."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"Fashion-MNIST: {stem}(.gz) not found in {str(directory)!r}; "
        + (
            "install it with `apt-get install dataset-fashion-mnist`"
            if directory == installed
            else "pass the directory that holds the IDX files"
        )
    )


def read_fashion_mnist(directory: str | Path, source_split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,1,28,28], labels int64 [N]) of Fashion-MNIST's 'train' or 'test' file pair.
    DataError naming the file unless the images are uint8 [N,H,W] and the labels one integer
    (IDX integer type) in 0-9 per image. O(file size)."""
    directory = Path(directory)
    img_stem, lab_stem = FMNIST_FILES[source_split]
    images = read_idx(_idx_path(directory, img_stem))
    lab_path = _idx_path(directory, lab_stem)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"Fashion-MNIST {img_stem}: expected uint8 [N,H,W] images, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"Fashion-MNIST {lab_stem}: {labels.shape} labels for {len(images)} images")
    if labels.dtype.kind not in "iu":
        raise DataError(f"Fashion-MNIST {str(lab_path)!r}: expected integer labels, got {labels.dtype}")
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"Fashion-MNIST {str(lab_path)!r}: label {bad} out of range 0-9")
    return images[:, None, :, :], labels.astype(np.int64)


def read_cifar_bin(paths: list[Path] | tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,3,32,32], labels int64 [N]) from CIFAR-10 binary batch files (records of
    1 label byte + 3072 channel-planar pixel bytes). Never unpickles. O(total file size)."""
    images, labels = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(
                f"CIFAR-10: {str(p)!r} not found; pass cifar10:DIR with the binary version's directory "
                "(data_batch_1.bin ... test_batch.bin, from cifar-10-binary.tar.gz)"
            )
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise DataError(
                f"CIFAR-10 {str(p)!r}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte records"
            )
        rec = raw.reshape(-1, CIFAR_RECORD)
        if int(rec[:, 0].max()) >= 10:
            raise DataError(f"CIFAR-10 {str(p)!r}: label {int(rec[:, 0].max())} out of range 0-9")
        labels.append(rec[:, 0].astype(np.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


# ---- dataset references and splits ----------------------------------------------------------


@dataclass(frozen=True)
class DatasetRef:
    """A parsed --dataset argument: kind ('fashion-mnist' | 'cifar10' | 'folder') and directory.
    `fmnist_dir` is where the Fashion-MNIST package is installed (FMNIST_DIR; not compared): a
    missing one names the package to install. `text` writes FMNIST_DIR bare, any other folder
    by name, so that `parse_dataset(ref.text)` reads the same folder."""

    kind: str
    directory: Path
    fmnist_dir: Path = field(default=FMNIST_DIR, compare=False, repr=False)

    @property
    def text(self) -> str:
        if self.kind == "fashion-mnist" and self.directory == FMNIST_DIR:  # bare: as parse_dataset reads it
            return "fashion-mnist"
        return f"{self.kind}:{self.directory}"

    @property
    def source_shape(self) -> tuple[int, int, int]:
        if self.kind == "folder":
            images = _source(self, "test")[0]
            return tuple(int(s) for s in images.shape[1:])  # type: ignore[return-value]
        return (1, 28, 28) if self.kind == "fashion-mnist" else (3, 32, 32)


def parse_dataset(text: str, fmnist_dir: Path = FMNIST_DIR) -> DatasetRef:
    """Parse `fashion-mnist`, `fashion-mnist:DIR`, `cifar10:DIR` or `folder:DIR`. `fmnist_dir`:
    where the Fashion-MNIST package is installed, which a bare `fashion-mnist` reads (the tests
    name a missing folder). O(1)."""
    kind, sep, directory = str(text).partition(":")
    kind = kind.strip().lower().replace("_", "-")
    if kind in ("fashion-mnist", "fmnist"):
        return DatasetRef("fashion-mnist", Path(directory) if sep and directory else fmnist_dir, fmnist_dir)
    if kind in ("cifar10", "cifar-10"):
        if not directory:
            raise DataError("dataset cifar10 needs a directory: --dataset cifar10:DIR (the binary version)")
        return DatasetRef("cifar10", Path(directory))
    if kind == "folder":
        if not directory:
            raise DataError("dataset folder needs a directory: --dataset folder:DIR (DIR/<class>/<image>)")
        return DatasetRef("folder", Path(directory))
    raise DataError(f"dataset {text!r}: expected fashion-mnist, fashion-mnist:DIR, cifar10:DIR or folder:DIR")


_RAW_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


def _source(ref: DatasetRef, source_split: str) -> tuple[np.ndarray, np.ndarray]:
    """The source's raw 'train' or 'test' set, cached per (files, size, mtime)."""
    if not ref.directory.is_dir():
        hint = (
            "install it with `apt-get install dataset-fashion-mnist`"
            if ref.kind == "fashion-mnist" and ref.directory == ref.fmnist_dir
            else "pass an existing directory"
        )
        raise DataError(f"{ref.kind}: directory {str(ref.directory)!r} not found; {hint}")
    if ref.kind == "folder":
        return _folder_source(ref, source_split)
    if ref.kind == "fashion-mnist":
        files = [_idx_path(ref.directory, stem, ref.fmnist_dir) for stem in FMNIST_FILES[source_split]]
    else:
        files = [ref.directory / n for n in (CIFAR_TRAIN if source_split == "train" else CIFAR_TEST)]
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (str(f),) for f in files)
    key = (ref.kind, source_split, stats)
    if key not in _RAW_CACHE:
        if ref.kind == "fashion-mnist":
            _RAW_CACHE[key] = read_fashion_mnist(ref.directory, source_split)
        else:
            _RAW_CACHE[key] = read_cifar_bin(files)
        while len(_RAW_CACHE) > 4:
            _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
    return _RAW_CACHE[key]


def _folder_source(ref: DatasetRef, source_split: str) -> tuple[np.ndarray, np.ndarray]:
    """An image folder's train or test set, cached per (folder, files' sizes and times)."""
    from dapdee.imagefolder import IMAGE_SUFFIXES, read_folder_split

    files = sorted(p for p in ref.directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    key = (
        ref.kind,
        source_split,
        str(ref.directory),
        tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
    )
    if key not in _RAW_CACHE:
        _RAW_CACHE[key] = read_folder_split(ref.directory, source_split)[:2]
        while len(_RAW_CACHE) > 4:
            _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
    return _RAW_CACHE[key]


def split_indices(n_train_source: int, split: str) -> np.ndarray:
    """Indices into the source's training set for 'train' or 'calib' (a fixed permutation;
    the last CALIB_SIZE positions are the calibration split). O(n)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_train_source)
    n_cal = min(CALIB_SIZE, n_train_source // 10)
    return perm[n_train_source - n_cal :] if split == "calib" else perm[: n_train_source - n_cal]


def shuffled_test_order(ref: DatasetRef, n: int) -> np.ndarray | None:
    """The order of the source's test set: a fixed permutation (seed TEST_SEED) of a folder's
    `n` class-ordered test images, None (the file's own order) for a built-in dataset. O(n)."""
    return np.random.default_rng(TEST_SEED).permutation(n) if ref.kind == "folder" else None


def load_raw(dataset: str | DatasetRef, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,C,h,w], int64 labels [N]) of one split ('train' | 'calib' | 'test'),
    the first `limit` samples when given (a folder's test set in `shuffled_test_order`).
    O(dataset file size) the first time, then cached."""
    ref = dataset if isinstance(dataset, DatasetRef) else parse_dataset(dataset)
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "test":
        images, labels = _source(ref, "test")
        order = shuffled_test_order(ref, len(labels))
        if order is not None:
            order = order[:limit]
            return images[order], labels[order]
    else:
        images, labels = _source(ref, "train")
        idx = split_indices(len(labels), split)
        if limit is not None:
            idx = idx[:limit]
        return images[idx], labels[idx]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def class_names(dataset: str | DatasetRef) -> tuple[str, ...]:
    """The names of the dataset's classes, by label: a folder's class folders (sorted by name),
    else the built-in dataset's. O(files) for a folder, O(1) otherwise."""
    ref = dataset if isinstance(dataset, DatasetRef) else parse_dataset(dataset)
    if ref.kind == "folder":
        from dapdee.imagefolder import folder_classes

        return folder_classes(ref.directory)
    return FMNIST_CLASSES if ref.kind == "fashion-mnist" else CIFAR_CLASSES


def split_sources(dataset: str | DatasetRef) -> dict[str, str]:
    """Where each split's samples come from, in words (an artifact manifest's `splits`):
    `train_source`, `calib_source`, `test_source`. O(1)."""
    ref = dataset if isinstance(dataset, DatasetRef) else parse_dataset(dataset)
    if ref.kind != "folder":
        return {
            "train_source": "train file minus calib (fixed permutation, split_seed)",
            "calib_source": "held out of the train file, never trained on",
            "test_source": "t10k" if ref.kind == "fashion-mnist" else "test_batch.bin",
        }
    from dapdee.imagefolder import TEST_EVERY, has_split_folders

    if has_split_folders(ref.directory):
        train, test = f"{ref.directory / 'train'}", f"{ref.directory / 'test'}"
    else:
        train = f"{ref.directory}: the images not in test"
        test = f"{ref.directory}: 1 in {TEST_EVERY} images (fixed permutation, split_seed)"
    return {
        "train_source": f"{train} minus calib (fixed permutation, split_seed)",
        "calib_source": "held out of the training images, never trained on",
        "test_source": f"{test}, in a fixed order (permutation, seed split_seed + 1), never trained on",
    }


# ---- preprocessing ---------------------------------------------------------------------------


_RESIZE_TEXT = {"pad": "zero-pad (centred)", "bilinear": "bilinear resize", "none": "no resize"}


def default_preprocess(dataset: str | DatasetRef, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The preprocessing recipe for `dataset` at model input `input_shape` [1,C,H,W]: pad when the
    target is at most 4 px larger, bilinear resize otherwise; replicate a grayscale channel when
    the model wants C > 1; per-channel normalisation with the dataset's mean/std. O(1)."""
    ref = dataset if isinstance(dataset, DatasetRef) else parse_dataset(dataset)
    if len(input_shape) != 4:
        raise DataError(f"input shape {list(input_shape)}: expected [1,C,H,W]")
    _, c, h, w = (int(s) for s in input_shape)
    sc, sh, sw = ref.source_shape
    if h == sh and w == sw:
        resize = "none"
    elif sh <= h <= sh + 4 and sw <= w <= sw + 4:
        resize = "pad"
    else:
        resize = "bilinear"
    if c == sc:
        channels = "as-is"
    elif sc == 1:
        channels = "replicate"
    else:
        raise DataError(f"{ref.kind} has {sc} channels; a model with {c} input channels cannot use it")
    if ref.kind == "folder":
        from dapdee.imagefolder import folder_norm

        mean, std = folder_norm(sc)
    else:
        mean, std = NORM[ref.kind]
    if channels == "replicate":
        mean, std = mean * c, std * c
    return {
        "source_shape": [sc, sh, sw],
        "scale": 1 / 255,
        "resize": resize,
        "channels": channels,
        "mean": list(mean),
        "std": list(std),
        "description": (
            f"uint8/255; {_RESIZE_TEXT[resize]}"
            f" {sh}x{sw} -> {h}x{w}; "
            + (f"grayscale replicated to {c} channels; " if channels == "replicate" else "")
            + f"(x - mean) / std per channel, mean={list(mean)}, std={list(std)}"
        ),
    }


def capture_frames(
    images: np.ndarray | torch.Tensor, input_shape: tuple[int, ...], preprocess: dict[str, Any]
) -> torch.Tensor:
    """The camera frames a device holds: uint8 images [N,c,h,w] (or [N,h,w]) brought to the
    model's resolution [N,C,H,W] as uint8 (pad with zeros, or bilinear resize rounded to the
    nearest level; grayscale replicated to C channels), following the recipe of
    :func:`default_preprocess`. Scaling and normalisation are left to :class:`FrameNormalize`,
    the first node of an artifact's graph, so the uplink carries 1 byte per pixel. O(N·C·H·W)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"images: expected [N,C,H,W] or [N,H,W], got shape {list(x.shape)}")
    if x.dtype != torch.uint8:
        raise DataError(f"images: expected uint8 pixels, got {x.dtype}")
    _, c, h, w = (int(s) for s in input_shape)
    resize = preprocess.get("resize", "none")
    ih, iw = x.shape[-2:]
    if resize == "pad" or (resize == "none" and (ih, iw) != (h, w)):
        if ih > h or iw > w:
            raise DataError(f"images are {ih}x{iw}, larger than the model input {h}x{w}; cannot pad")
        top, left = (h - ih) // 2, (w - iw) // 2
        x = F.pad(x, (left, w - iw - left, top, h - ih - top))
    elif resize == "bilinear":
        x = F.interpolate(x.to(torch.float32), size=(h, w), mode="bilinear", align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    elif resize != "none":
        raise DataError(f"preprocess: unknown resize {resize!r} (expected none, pad or bilinear)")
    if x.shape[1] != c:
        if x.shape[1] == 1 and preprocess.get("channels") == "replicate":
            x = x.expand(-1, c, -1, -1)
        else:
            raise DataError(f"images have {x.shape[1]} channels, the model wants {c}")
    return x.contiguous()


def shown(v: Any) -> str:
    """`v` for an error message: as JSON (else its repr), cut to 80 characters. O(size of v)."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):  # not JSON-able, or an int past Python's str() digit limit
        try:
            text = repr(v)
        except ValueError:
            text = f"a {type(v).__name__} too long to show"
    return text if len(text) <= 80 else text[:77] + "..."


class FrameNormalize(nn.Module):
    """Raw frame -> model input: `(x · scale − mean) / std` per channel, as one affine map
    `x · gain + shift` on float32. Takes uint8 frames or any tensor of 0..255 pixel levels (the
    edge worker upcasts wire tensors to float32), so it may run on either side of a cut. O(n)."""

    def __init__(self, scale: float, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean or any(not s > 0 for s in std):
            raise DataError(f"preprocess: mean {mean} and std {std} must be non-empty, equally long, std > 0")
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        sd = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("gain", (float(scale) / sd).to(torch.float32))
        self.register_buffer("shift", (-m / sd).to(torch.float32))

    @classmethod
    def from_recipe(cls, preprocess: dict[str, Any], channels: int) -> FrameNormalize:
        """The normalisation of a `preprocess` recipe for a model of `channels` input channels:
        `scale` (absent: 1/255), `mean` and `std` (absent: 0 and 1 per channel; one value, or one
        per channel). A field that is present must hold such a value: null or a mean/std of
        another length is a DataError naming the field. O(channels)."""
        scale = preprocess.get("scale", 1 / 255)
        if not is_finite_number(scale) or not scale > 0:
            raise DataError(f"preprocess.scale: expected a finite number > 0, got {shown(scale)}")
        stats = {"mean": preprocess.get("mean", [0.0] * channels), "std": preprocess.get("std", [1.0] * channels)}
        for key, values in stats.items():
            if not isinstance(values, (list, tuple)) or not all(is_finite_number(v) for v in values):
                raise DataError(f"preprocess.{key}: expected a list of finite numbers, got {shown(values)}")
            if len(values) not in (1, channels):
                want = "1" if channels == 1 else f"1 or {channels}"
                raise DataError(
                    f"preprocess.{key}: {len(values)} values for a model of {channels} input channel(s) "
                    f"(expected {want})"
                )
        return cls(float(scale), list(stats["mean"]), list(stats["std"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(torch.float32), self.gain)


def preprocess_images(
    images: np.ndarray | torch.Tensor, input_shape: tuple[int, ...], preprocess: dict[str, Any]
) -> torch.Tensor:
    """Turn uint8 images [N,c,h,w] (or [N,h,w]) into float32 model inputs [N,C,H,W]:
    :func:`capture_frames` then :class:`FrameNormalize` — the same two steps a device and an
    artifact's graph take, so training, evaluation and serving see identical tensors. O(N·C·H·W)."""
    frames = capture_frames(images, input_shape, preprocess)
    with torch.no_grad():  # not inference_mode: training feeds these tensors to autograd
        return FrameNormalize.from_recipe(preprocess, int(input_shape[1]))(frames).contiguous()


def load_split(
    dataset: str | DatasetRef,
    split: str,
    input_shape: tuple[int, ...],
    preprocess: dict[str, Any] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 [N,C,H,W], y int64 [N]) of one split, preprocessed for `input_shape`
    (recipe: `preprocess`, default :func:`default_preprocess`). Materialises the whole split:
    for large inputs (224 px) use :func:`iter_batches`. O(N·C·H·W)."""
    pre = preprocess or default_preprocess(dataset, input_shape)
    images, labels = load_raw(dataset, split, limit)
    return preprocess_images(images, input_shape, pre), torch.as_tensor(labels)


def iter_batches(
    dataset: str | DatasetRef,
    split: str,
    input_shape: tuple[int, ...],
    preprocess: dict[str, Any] | None = None,
    batch_size: int = 256,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield preprocessed (x, y) batches of one split in order; memory O(batch). Same tensors as
    :func:`load_split`, batch by batch. O(N·C·H·W) in total."""
    pre = preprocess or default_preprocess(dataset, input_shape)
    images, labels = load_raw(dataset, split, limit)
    for i in range(0, len(labels), batch_size):
        yield (
            preprocess_images(images[i : i + batch_size], input_shape, pre),
            torch.as_tensor(labels[i : i + batch_size]),
        )
