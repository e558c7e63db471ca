"""The device reads an image folder the way training did: `--source DIR` with training's split
layout (DIR/train/<class>, DIR/test/<class>) classifies DIR/test with training's labels, and a
folder image becomes the same frame training made of it (the manifest's recipe: zero-pad or
resize after bringing it to the dataset's source shape)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee.data import DataError
from dapdee.device.frames import FrameFormat, ImageFolderSource, open_source
from dapdee.imagefolder import decode_image, read_folder_split
from tests.images import write_png


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """DIR/train/{cat,dog,fox} and DIR/test/{cat,dog,fox}: 28x28 grayscale images, and one
    40x30 RGB test image (training brings it to the reference's 28x28 grayscale)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "pets"
    for split in ("train", "test"):
        for c in ("cat", "dog", "fox"):
            for i in range(2):
                write_png(root / split / c / f"{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    write_png(root / "test" / "dog" / "big.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return root


def test_device_source_reads_test_of_the_split_layout(split_folder: Path) -> None:
    src = open_source(str(split_folder), FrameFormat((1, 1, 28, 28), "uint8"))
    assert isinstance(src, ImageFolderSource)
    assert src.folder.classes == ("cat", "dog", "fox")  # not ('test', 'train')
    frames = list(src)
    _, labels, classes = read_folder_split(split_folder, "test")
    assert classes == src.folder.classes and [f.label for f in frames] == labels.tolist()
    assert all(Path(f.source).relative_to(split_folder / "test") for f in frames)


def test_device_source_refuses_split_folders_whose_classes_differ(split_folder: Path) -> None:
    write_png(split_folder / "train" / "owl" / "0.png", np.zeros((28, 28), np.uint8))
    with pytest.raises(DataError, match="different class folders"):
        open_source(str(split_folder), FrameFormat((1, 1, 28, 28), "uint8"))


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 3, 64, 64), (1, 1, 28, 28)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_device_frames_equal_training_frames(split_folder: Path, shape: tuple[int, ...], dtype: str) -> None:
    """pad (28 -> 32), bilinear + replicated channels (28 -> 64, RGB model) and as-is, for an
    artifact's raw-frame graph (uint8) and a float model."""
    ref = D.parse_dataset(f"folder:{split_folder}")
    pre = D.default_preprocess(ref, shape)
    images, labels, _ = read_folder_split(split_folder, "test")  # what training evaluated on
    if dtype == "uint8":
        want = D.capture_frames(images, shape, pre)
    else:
        want = D.preprocess_images(images, shape, pre)
    frames = list(ImageFolderSource(split_folder, FrameFormat(shape, dtype, pre)))
    assert len(frames) == len(want) == 7
    for frame, expected in zip(frames, want, strict=True):
        assert frame.x.dtype == expected.dtype and frame.x.shape == (1, *expected.shape)
        assert torch.equal(frame.x[0], expected) if dtype == "uint8" else torch.allclose(frame.x[0], expected)


def test_device_pads_like_training_in_a_flat_folder(tmp_path: Path) -> None:
    """A 28x28 image for a 32x32 model trained with the 'pad' recipe: a zero border of 2 px."""
    rng = np.random.default_rng(4)
    for c in ("a", "b"):
        for i in range(3):
            write_png(tmp_path / "flat" / c / f"{i}.png", rng.integers(1, 256, (28, 28), dtype=np.uint8))
    shape = (1, 1, 32, 32)
    pre = D.default_preprocess(D.parse_dataset(f"folder:{tmp_path / 'flat'}"), shape)
    assert pre["resize"] == "pad"
    for frame in ImageFolderSource(tmp_path / "flat", FrameFormat(shape, "uint8", pre)):
        image = decode_image(frame.source)[:, :, 0]
        assert np.array_equal(frame.x[0, 0].numpy(), np.pad(image, 2))


def test_without_a_recipe_frames_are_resized_as_before(split_folder: Path) -> None:
    """No manifest recipe (a spec without an artifact): channels converted, bilinear resize."""
    from dapdee.imagefolder import image_tensor

    shape = (1, 1, 32, 32)
    for frame in ImageFolderSource(split_folder / "test", FrameFormat(shape, "uint8")):
        assert torch.equal(frame.x, image_tensor(decode_image(frame.source), shape))


def test_class_folders_are_labelled_by_the_models_class_names(tmp_path: Path) -> None:
    """A device folder holds two of the fmnist artifact's ten classes, `trouser/` and `Boot/`:
    their frames are labelled 1 and 9, the model's labels of those names (case aside). Before,
    the folders' name order labelled them 0 and 1, and the report's accuracy compared the model's
    answers with the wrong classes (0.40 against 0.90 for the same 40 images). A folder the model
    has no class of is a DataError naming it; a model without class names keeps name order."""
    import json

    classes = tuple(json.loads(Path("artifacts/fmnist-alexnet/manifest.json").read_text())["classes"])
    rng = np.random.default_rng(5)
    for name in ("trouser", "Boot"):
        for i in range(2):
            write_png(tmp_path / "some" / name / f"{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    fmt = FrameFormat((1, 1, 32, 32), "uint8", None, classes)
    labels = {Path(f.source).parent.name: f.label for f in ImageFolderSource(tmp_path / "some", fmt)}
    assert labels == {"Boot": 9, "trouser": 1}
    unnamed = {
        Path(f.source).parent.name: f.label for f in ImageFolderSource(tmp_path / "some", replace(fmt, classes=None))
    }
    assert unnamed == {"Boot": 0, "trouser": 1}
    write_png(tmp_path / "some" / "hat" / "0.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="class folder 'hat' is not one of the model's classes"):
        ImageFolderSource(tmp_path / "some", fmt)
