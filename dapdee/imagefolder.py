"""Image folders: a user's own pictures, for training (`--dataset folder:DIR`) and for the device
runtime (`dapdee device run --source DIR`), read the same way so labels mean the same thing.

Layout: `DIR/<class>/**/*.png|jpg|…` (labelled: a class's label is its folder's index among the
class folders sorted by name, as torchvision's ImageFolder does), or images directly in `DIR`
(unlabelled). For training, `DIR/train/<class>/…` and `DIR/test/<class>/…` are used as the
train and test sets when both exist; otherwise a fixed permutation puts every fifth image of
`DIR` into the test set. A device given such a `DIR` classifies `DIR/test` (`device_folder`).

Images are decoded with PyAV (FFmpeg; the same library reads videos and cameras), never
unpickled. Every failure is a `DataError` naming the file or folder. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dapdee.data import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MAX_PIXELS = 1 << 26  # a larger image is refused (64 Mpixel)
# FFmpeg's own bound on a picture, for every file it opens here: probing a file decodes its first
# picture before any check of ours sees the size, so a small file declaring a huge picture (a
# decompression bomb) would be allocated first. FFmpeg counts the width rounded up to its
# alignment, so its bound is twice ours; the exact cap is ours (`_check_pixels`).
FFMPEG_LIMITS = {"max_pixels": str(2 * MAX_PIXELS)}
MAX_IMAGES = 1_000_000
# a split is held in memory at the reference image's size (N x C x h x w bytes): past this, the
# folder's images are too large for what a model reads, and should be shrunk before training
MAX_FOLDER_BYTES = 1 << 32  # 4 GiB
TEST_EVERY = 5  # without train/ and test/ folders, 1 image in 5 is a test image
SPLIT_SEED = 20250291


@dataclass(frozen=True)
class ImageFolder:
    """A scanned folder: `classes` (empty when unlabelled) and `items` (path, label or None),
    classes in name order, files in path order within a class."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[tuple[Path, int | None], ...]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _images_in(directory: Path, recursive: bool) -> list[Path]:
    it = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in it if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def scan_image_folder(root: str | Path) -> ImageFolder:
    """Scan `root` (see the module docstring). DataError when it is not a directory, holds no
    images, or mixes images with class folders. O(files)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _images_in(d, True))
    loose = _images_in(root, False)
    if classes and loose:
        raise DataError(
            f"image folder {str(root)!r} holds both images ({loose[0].name}, …) and class folders "
            f"({', '.join(classes[:3])}); put every image in a class folder, or none"
        )
    if classes:
        items = [(p, i) for i, c in enumerate(classes) for p in _images_in(root / c, True)]
    else:
        items = [(p, None) for p in loose]
    if not items:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"image folder {str(root)!r} holds no images ({suffixes}), directly or in class folders")
    if len(items) > MAX_IMAGES:
        raise DataError(f"image folder {str(root)!r} holds {len(items)} images; at most {MAX_IMAGES} are read")
    return ImageFolder(root, tuple(classes), tuple(items))


def decode_image(path: str | Path) -> np.ndarray:
    """The image at `path` as uint8 [H, W, 3] RGB (or [H, W, 1] for a grayscale file).
    DataError naming the file when it cannot be read or decoded. O(pixels)."""
    import av

    path = Path(path)
    try:
        with av.open(str(path), options=FFMPEG_LIMITS) as container:
            if not container.streams.video:
                raise DataError(f"image {str(path)!r}: no picture in the file")
            stream = container.streams.video[0]
            _check_pixels(path, stream.width, stream.height)
            stream.codec_context.options = FFMPEG_LIMITS
            frame = next(container.decode(stream))
            _check_pixels(path, frame.width, frame.height)
            if frame.format.name.startswith(("gray", "ya")):
                return frame.to_ndarray(format="gray")[:, :, None]
            return frame.to_ndarray(format="rgb24")
    except DataError:
        raise
    except av.ArgumentError as exc:  # FFmpeg's bound (EINVAL) before the size was known
        raise DataError(f"image {str(path)!r}: cannot decode ({exc}): over {MAX_PIXELS} pixels?") from None
    except (av.FFmpegError, OSError, StopIteration, ValueError, IndexError) as exc:
        raise DataError(f"image {str(path)!r}: cannot decode ({type(exc).__name__}: {exc})") from None


def _check_pixels(path: Path, width: int, height: int) -> None:
    """DataError when a `width` x `height` picture is over MAX_PIXELS (0 x 0: not known yet)."""
    if width * height > MAX_PIXELS:
        raise DataError(f"image {str(path)!r}: {width}x{height} is over {MAX_PIXELS} pixels")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, c] -> [channels, H, W]: grayscale replicated, RGB to luminance (ITU-R BT.601
    weights) for one channel, extra channels dropped. O(pixels)."""
    c = image.shape[2]
    if c == channels:
        out = image
    elif c == 1:
        out = np.repeat(image, channels, axis=2)
    elif channels == 1:
        lum = image[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out = np.clip(np.rint(lum), 0, 255).astype(np.uint8)[:, :, None]
    else:
        out = image[:, :, :channels]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [C, h, w] -> [C, height, width] by bilinear interpolation, rounded. O(pixels)."""
    if image.shape[1:] == (height, width):
        return image
    x = torch.from_numpy(image).to(torch.float32)[None]
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def _split_items(folder: ImageFolder, source_split: str) -> list[tuple[Path, int | None]]:
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(folder.items))
    test = {int(i) for k, i in enumerate(perm) if k % TEST_EVERY == 0}
    want_test = source_split == "test"
    return [item for i, item in enumerate(folder.items) if (i in test) == want_test]


def has_split_folders(root: str | Path) -> bool:
    """Does `root` hold the split layout, `root/train/<class>/…` and `root/test/<class>/…`
    (both folders present)? O(1)."""
    root = Path(root)
    return (root / "train").is_dir() and (root / "test").is_dir()


def folder_classes(root: str | Path) -> tuple[str, ...]:
    """The class names (labels' order) training on `--dataset folder:root` uses: the class
    folders of `root/train` in the split layout, else of `root`. DataError as for
    `read_folder_split`. O(files)."""
    return _split_source(Path(root), "train")[0].classes


def device_folder(root: str | Path) -> ImageFolder:
    """The folder a device classifies for `--source root`: `root/test` in the split layout
    (`has_split_folders`; its class folders must be train/'s, so labels mean what training
    meant), else `root` itself, every image. DataError as for `scan_image_folder`. O(files)."""
    root = Path(root)
    return _split_source(root, "test")[0] if has_split_folders(root) else scan_image_folder(root)


def _split_source(root: Path, source_split: str) -> tuple[ImageFolder, list[tuple[Path, int | None]], Path]:
    """(the folder the split's classes come from, the split's items, the reference image)."""
    if has_split_folders(root):
        train, test = scan_image_folder(root / "train"), scan_image_folder(root / "test")
        if train.classes != test.classes:
            raise DataError(f"image folder {str(root)!r}: train/ and test/ hold different class folders")
        folder = train if source_split == "train" else test
        return folder, list(folder.items), train.items[0][0]
    folder = scan_image_folder(root)
    return folder, _split_items(folder, source_split), folder.items[0][0]


def read_folder_split(
    root: str | Path, source_split: str, max_bytes: int = MAX_FOLDER_BYTES
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(uint8 images [N, C, h, w], int64 labels [N], class names) of a labelled folder's 'train'
    or 'test' set (see the module docstring). Every image is brought to the channel count and
    size (height, width) of the reference image (the first of train/, else of the folder), so
    both sets have one shape. The split is held at that size, so it is a DataError naming the
    folder when it would take more than `max_bytes` (checked before any other image is read);
    also for an unlabelled folder, an unreadable image (named), or train/ and test/ folders whose
    classes differ. O(total pixels)."""
    root = Path(root)
    folder, items, reference = _split_source(root, source_split)
    if not folder.labelled:
        raise DataError(f"image folder {str(root)!r}: training needs class folders (DIR/<class>/<image>)")
    ref = decode_image(reference)
    (h, w), channels = ref.shape[:2], ref.shape[2]
    need = len(items) * channels * h * w
    if need > max_bytes:
        raise DataError(
            f"image folder {str(root)!r}: its {source_split} set is {len(items)} images of {channels}x{h}x{w} "
            f"(the size of {reference.name}), {need / 2**30:.1f} GiB held in memory, over the limit of "
            f"{max_bytes / 2**30:g} GiB; shrink the images (a model's input is far smaller) or use fewer"
        )
    images = np.zeros((len(items), channels, h, w), np.uint8)
    for i, (path, _) in enumerate(items):
        images[i] = resize_to(to_channels(decode_image(path), channels), h, w)
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    return images, labels, folder.classes


def image_tensor(image: np.ndarray, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A decoded image as a raw uint8 frame [1, C, H, W] at the model's input shape (channels
    converted, bilinear resize). O(pixels)."""
    if len(input_shape) != 4:
        raise DataError(f"input shape {list(input_shape)}: expected [1, C, H, W]")
    _, c, h, w = (int(s) for s in input_shape)
    return torch.from_numpy(resize_to(to_channels(image, c), h, w))[None].contiguous()


def folder_norm(channels: int) -> tuple[list[float], list[float]]:
    """Normalisation of a user's folder (its statistics are unknown): mean 0.5, std 0.25 per
    channel, so pixel levels map to about [-2, 2]. O(channels)."""
    return [0.5] * channels, [0.25] * channels
