"""Real inputs for the device (dapdee.device.frames) and for training (`--dataset folder:DIR`):
image folders with and without class folders, a video written here with PyAV, and every kind of
bad input: an unreadable image (skipped, counted), a folder with no images, a corrupt video or
a missing camera (a DataError naming it), a video that ends early (counted)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from dapdee.data import DataError, load_raw, parse_dataset
from dapdee.device.frames import FrameFormat, ImageFolderSource, VideoSource, open_source
from dapdee.imagefolder import decode_image, read_folder_split, scan_image_folder

RAW = FrameFormat((1, 1, 28, 28), "uint8")  # an artifact's graph: raw frames at 28x28
FLOAT = FrameFormat((1, 3, 32, 32), "float32")


def _png(path: Path, pixels: np.ndarray) -> None:
    """Write `pixels` (uint8 [H, W, 3] or [H, W]) as a PNG with PyAV's encoder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _video(path: Path, frames: int, size: int = 32, container: str | None = None, noise: bool = False) -> list[int]:
    """A video of `frames` flat grey frames (levels 10, 30, 50, ... mod 250; random pixels with
    `noise`, so the file is large next to its header); returns the levels."""
    levels = [(10 + 20 * i) % 250 for i in range(frames)]
    rng = np.random.default_rng(2)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for level in levels:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noise else np.full((size, size, 3), level)
            picture = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return levels


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/ (3 images, one grayscale), dog/ (2 images + an unreadable one)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for i in range(2):
        _png(root / "cat" / f"{i}.png", rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
    _png(root / "cat" / "gray.png", np.full((40, 40), 200, np.uint8))
    for i in range(2):
        _png(root / "dog" / f"{i}.png", np.full((16, 16, 3), 60, np.uint8))
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored: not an image")
    return root


def test_labelled_folder_gives_labels_by_class_folder(folder: Path) -> None:
    src = open_source(str(folder), RAW)
    assert isinstance(src, ImageFolderSource)
    frames = list(src)
    assert [f.label for f in frames] == [0, 0, 0, 1, 1]  # cat=0, dog=1 (sorted class names)
    assert all(f.x.shape == (1, 1, 28, 28) and f.x.dtype == torch.uint8 for f in frames)
    # the unreadable image is skipped and counted, naming the file
    assert src.stats.decoded == 5 and src.stats.skipped == 1 and "broken.jpg" in src.stats.reasons[0]
    gray = next(f for f in frames if f.source and f.source.endswith("gray.png"))
    assert int(gray.x.min()) == int(gray.x.max()) == 200  # a flat grey image stays flat after resizing
    dog = frames[-1]
    assert int(dog.x.min()) == int(dog.x.max()) == 60  # RGB (60, 60, 60) -> luminance 60


def test_folder_frames_for_a_float_model_are_normalised(folder: Path) -> None:
    frames = list(open_source(str(folder), FLOAT, limit=2))
    assert len(frames) == 2 and frames[0].x.shape == (1, 3, 32, 32) and frames[0].x.dtype == torch.float32
    dog = list(open_source(str(folder / "dog"), FLOAT))
    assert dog[0].label is None  # loose images: unlabelled
    assert torch.allclose(dog[0].x, torch.full_like(dog[0].x, (60 / 255 - 0.5) / 0.25), atol=1e-5)


def test_bad_folders_are_clear_errors(tmp_path: Path, folder: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        open_source(str(empty), RAW)
    _png(folder / "loose.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="both images"):
        scan_image_folder(folder)
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(folder / "dog" / "broken.jpg")
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(str(tmp_path / "missing"), RAW)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path: Path) -> None:
    """A PNG whose header states 9000x9000 pixels (81 M, over the 64 M cap) and carries a few
    rows: refused for its size, the error naming the cap."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 9000
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(b"\x00" * (3 * side + 1) * 4)
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"huge\.png.*over 67108864 pixels"):
        decode_image(path)


def read_as_video(path: str) -> None:
    """Every frame of `path` through the device's video source (DataError as it refuses)."""
    from dapdee.device.frames import VideoSource

    list(VideoSource(path, RAW, limit=1))


def _zero_png(path: Path, width: int, height: int) -> str:
    """A grayscale PNG of zeros written at `path` (returned as text): small on disk whatever its
    size decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(b"\x00" * (width + 1)) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return str(path)


def test_a_decompression_bomb_is_refused_before_its_picture_is_allocated(tmp_path: Path) -> None:
    """A 12000x12000 grayscale PNG of zeros (144 MB decoded, ~140 KB on disk): refused without
    the process growing by its picture (probing the file decodes its first picture, so a check
    of the stated size after the open came too late), by the image reader and by the device's
    video source (which opens any file it is given). Peak RSS of a fresh process, against one
    decoding an 8x8 picture."""
    from tests.peak_rss import peak_kib

    small, small_kib = peak_kib("dapdee.imagefolder:decode_image", _zero_png(tmp_path / "small.png", 8, 8))
    bomb_png = _zero_png(tmp_path / "bomb.png", 12000, 12000)
    bomb, bomb_kib = peak_kib("dapdee.imagefolder:decode_image", bomb_png)
    _, video_kib = peak_kib("tests.test_frames:read_as_video", bomb_png)
    assert small == "ok" and bomb.startswith("refused") and "over 67108864 pixels" in bomb, bomb
    assert bomb_kib - small_kib < 48 * 1024, (small_kib, bomb_kib)  # the picture alone is 140 MB
    assert video_kib - small_kib < 48 * 1024, (small_kib, video_kib)


def test_an_image_just_under_the_pixel_cap_decodes(tmp_path: Path) -> None:
    """8193x8191 (one pixel under the 64 M cap, a width FFmpeg rounds up past it): decoded
    (FFmpeg's bound is looser than the cap, which is checked exactly)."""
    image = decode_image(_zero_png(tmp_path / "edge.png", 8193, 8191))
    assert image.shape == (8191, 8193, 1)


def test_video_frames_in_order(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    levels = _video(path, 12)
    src = open_source(str(path), RAW)
    assert isinstance(src, VideoSource) and "12 frames" in src.describe()
    frames = list(src)
    assert len(frames) == 12 and src.stats.skipped == 0
    means = [float(f.x.float().mean()) for f in frames]
    assert means == pytest.approx(levels, abs=4)  # lossy codec: close to the written levels, in order
    assert len(list(open_source(str(path), RAW, limit=5))) == 5


def test_bad_videos_and_cameras(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(DataError, match="junk.mp4"):
        open_source(str(junk), RAW)
    whole = tmp_path / "whole.mp4"
    _video(whole, 12)
    cut = tmp_path / "cut.mp4"  # the index (moov) is at the end of an mp4: half a file has no stream
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.mp4"):
        open_source(str(cut), RAW)
    with pytest.raises(DataError, match="camera '/dev/video99'"):
        open_source("/dev/video99", RAW)


def test_a_video_that_ends_early_is_counted(tmp_path: Path) -> None:
    """An AVI declares its length up front; cut short, its last frames never arrive: the frames
    that do are delivered and the missing ones counted as skipped, without an error."""
    whole = tmp_path / "whole.avi"
    _video(whole, 20, size=64, container="avi", noise=True)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    src = open_source(str(cut), RAW)
    frames = list(src)
    assert 0 < len(frames) < 20
    assert src.stats.decoded + src.stats.skipped == 20, src.stats
    assert any("ended" in r for r in src.stats.reasons), src.stats.reasons


def test_training_reads_the_same_folder_layout(tmp_path: Path) -> None:
    """`--dataset folder:DIR`: train/test carved by a fixed rule, labels by class folder, every
    image at the reference image's size and channels; and a 1-epoch training run on it."""
    rng = np.random.default_rng(1)
    root = tmp_path / "shapes"
    for c, level in (("dark", 40), ("light", 220)):
        for i in range(10):
            _png(root / c / f"{i}.png", np.clip(rng.normal(level, 10, (12, 12)), 0, 255).astype(np.uint8))
    images, labels, classes = read_folder_split(root, "train")
    test_images, test_labels, _ = read_folder_split(root, "test")
    assert classes == ("dark", "light") and len(labels) + len(test_labels) == 20 and len(test_labels) == 4
    assert images.shape[1:] == test_images.shape[1:] == (3, 12, 12)
    ref = parse_dataset(f"folder:{root}")
    assert ref.kind == "folder" and ref.source_shape == (3, 12, 12)
    assert sorted(set(load_raw(ref, "train")[1].tolist())) == [0, 1]
    with pytest.raises(DataError, match="folder:DIR"):
        parse_dataset("folder:")

    from dapdee.cli import main

    out = tmp_path / "artifact"
    spec = "zoo:alexnet?width=0.25&num_classes=2"
    args = ["train", spec, "--dataset", f"folder:{root}", "--epochs", "1", "--batch-size", "4"]
    assert main([*args, "--input-size", "32", "--no-progress", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == f"folder:{root}" and manifest["dataset_kind"] == "folder"
