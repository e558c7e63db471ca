"""Frame sources: what the device classifies.

- `random_frames`: seeded random inputs of the model's shape, no labels;
- `DatasetSource`: a built-in dataset's test split (`fashion-mnist`, `cifar10:DIR`), labelled;
- `ImageFolderSource`: a folder of images, labelled by class folder (`DIR/<class>/<image>`,
  the layout `dapdee train --dataset folder:DIR` trains on) or unlabelled;
- `VideoSource`: a video file or a camera (`/dev/videoN`), decoded with PyAV.

`open_source(text, fmt, limit)` picks one from a `--source` argument. Every frame is brought to
the model's input the way training did (`FrameFormat`): the raw uint8 frame at the model's
resolution when the graph takes frames (artifacts), else normalised. A source that cannot be
opened (no such folder, a folder without images, a corrupt video, a missing camera) is a
`DataError` naming it; an image that cannot be decoded, a video frame that fails to decode or a
video that ends before its declared length is counted in `stats` and skipped, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapdee import data as D
from dapdee.data import DataError
from dapdee.device.types import Frame
from dapdee.imagefolder import (
    FFMPEG_LIMITS,
    decode_image,
    device_folder,
    folder_norm,
    image_tensor,
    resize_to,
    to_channels,
)
from dapdee.models import LoadedModel, example_input

log = logging.getLogger("dapdee.device.frames")

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"})
MAX_REASONS = 5


@dataclass
class FrameStats:
    """What a source delivered: frames `decoded`, frames `skipped` (unreadable image, a frame
    that failed to decode, frames a video declared but never delivered), the first reasons."""

    decoded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped += count
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        log.warning("frame source: skipped %d: %s", count, reason)


@dataclass(frozen=True)
class FrameFormat:
    """The model's input: shape [1, C, H, W], dtype (uint8 for an artifact's graph, which
    normalises frames itself) and the preprocessing recipe training used (or None)."""

    shape: tuple[int, ...]
    dtype: str
    preprocess: dict[str, Any] | None = None
    classes: tuple[str, ...] | None = None  # the model's class names, in label order (its manifest)

    @classmethod
    def of(cls, loaded: LoadedModel) -> FrameFormat:
        manifest = loaded.manifest or {}
        classes = manifest.get("classes")
        names = tuple(str(c) for c in classes) if isinstance(classes, list) and classes else None
        return cls(tuple(loaded.input_shape), loaded.graph.input.dtype, manifest.get("preprocess"), names)

    def capture(self, image: np.ndarray) -> torch.Tensor:
        """A decoded image uint8 [H, W, c] as the raw uint8 frame [1, C, H', W'] at the model's
        resolution. With a training recipe that records its `source_shape` [c0, h0, w0], the way
        training read its dataset: channels converted and resized to the source shape (as
        `read_folder_split` does), then the recipe's `capture_frames` (zero-pad or resize,
        grayscale replicated), so the device's frame of an image is the training frame of that
        image. Without one: channels converted, bilinear resize (`image_tensor`). O(pixels)."""
        source = (self.preprocess or {}).get("source_shape")
        if not source:
            return image_tensor(image, self.shape)
        c, h, w = (int(s) for s in source)
        raw = resize_to(to_channels(image, c), h, w)[None]
        return D.capture_frames(raw, self.shape, self.preprocess or {})

    def prepare(self, frame: torch.Tensor) -> torch.Tensor:
        """A raw uint8 frame [1, C, H, W] at the model's resolution as the model's input. O(pixels)."""
        if self.dtype == "uint8":
            return frame
        channels = int(self.shape[1])
        mean, std = folder_norm(channels)
        recipe = self.preprocess or {"scale": 1 / 255, "mean": mean, "std": std}
        with torch.no_grad():
            return D.FrameNormalize.from_recipe(recipe, channels)(frame).contiguous()


def random_frames(fmt: FrameFormat, n: int, seed: int = 0) -> Iterator[Frame]:
    """`n` seeded random inputs of the model's shape and dtype, without labels. O(n x input)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        yield Frame(example_input(fmt.shape, fmt.dtype, g), None, f"random:{i}")


class DatasetSource:
    """The test split of a built-in dataset (`fashion-mnist`, `cifar10:DIR`), the first `limit`
    images, labelled; prepared as the artifact's manifest says (else the dataset's recipe)."""

    def __init__(self, name: str, fmt: FrameFormat, limit: int | None = None) -> None:
        self.ref = D.parse_dataset(name)
        self.fmt = fmt
        self.pre = fmt.preprocess or D.default_preprocess(self.ref, fmt.shape)
        self.images, self.labels = D.load_raw(self.ref, "test", limit)
        self.stats = FrameStats()

    def describe(self) -> str:
        return f"{len(self.labels)} {self.ref.text} test images"

    def __iter__(self) -> Iterator[Frame]:
        prepare = D.capture_frames if self.fmt.dtype == "uint8" else D.preprocess_images
        for i in range(len(self.labels)):
            self.stats.decoded += 1
            yield Frame(prepare(self.images[i : i + 1], self.fmt.shape, self.pre), int(self.labels[i]), f"test:{i}")


class ImageFolderSource:
    """The images of a folder (`DIR/<class>/<image>` labelled, or loose images unlabelled), in
    class then path order, the first `limit`; of `DIR/test` when DIR has training's split layout
    (`DIR/train/<class>`, `DIR/test/<class>`). Each is brought to the model's input as training
    did (`FrameFormat.capture`). A class folder's label is the model's index of its name (the
    manifest's `classes`, matched without regard to case), so a folder of some classes, or of
    classes named in another order, is labelled as the model labels them; DataError naming a
    folder the model has no class of. Without class names (a model with no manifest), the
    folders' name order. An image that cannot be decoded is skipped and counted (its name in
    `stats.reasons`). Opening scans the folder: O(files)."""

    def __init__(self, root: str | Path, fmt: FrameFormat, limit: int | None = None) -> None:
        self.folder = device_folder(root)
        self.fmt = fmt
        self.limit = limit
        self.stats = FrameStats()
        self._labels = _model_labels(self.folder.root, self.folder.classes, fmt.classes)

    def describe(self) -> str:
        kind = f"{len(self.folder.classes)} classes" if self.folder.labelled else "unlabelled"
        return f"image folder {str(self.folder.root)!r} ({len(self.folder.items)} images, {kind})"

    def __iter__(self) -> Iterator[Frame]:
        for path, label in self.folder.items:
            if self.limit is not None and self.stats.decoded >= self.limit:
                return
            try:
                image = decode_image(path)
            except DataError as exc:
                self.stats.skip(str(exc))
                continue
            self.stats.decoded += 1
            label = label if label is None or self._labels is None else self._labels[label]
            yield Frame(self.fmt.prepare(self.fmt.capture(image)), label, str(path))


def _model_labels(root: Path, folders: tuple[str, ...], classes: tuple[str, ...] | None) -> list[int] | None:
    """Per class folder (in name order), the model's label of its name; None to keep the folders'
    order (no folders, or no class names). DataError naming a folder the model has no class of.
    O(folders + classes)."""
    if not folders or not classes:
        return None
    index = {c.lower(): i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f.lower() not in index]
    if unknown:
        raise DataError(
            f"image folder {str(root)!r}: class folder {unknown[0]!r} is not one of the model's classes "
            f"({', '.join(classes)}); name each folder after a class, or leave the images unlabelled"
        )
    return [index[f.lower()] for f in folders]


class VideoSource:
    """Frames of a video file or a camera (`/dev/videoN`, Video4Linux2), decoded with PyAV, the
    first `limit`. Opening checks that there is a video stream: DataError naming the file or
    camera otherwise. While reading, a packet that fails to decode is skipped and counted, and
    a file that ends before the length its header declares is counted as skipped frames."""

    def __init__(self, location: str, fmt: FrameFormat, limit: int | None = None) -> None:
        import av

        self.location = location
        self.fmt = fmt
        self.limit = limit
        self.stats = FrameStats()
        camera = location.startswith("/dev/video")
        what = "camera" if camera else "video"
        try:
            self.container = av.open(location, format="v4l2" if camera else None, options=FFMPEG_LIMITS)
        except (av.FFmpegError, OSError) as exc:
            raise DataError(f"{what} {location!r}: cannot open ({_reason(exc)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise DataError(f"{what} {location!r}: no video stream (not a video, or a corrupt one)")
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.options = FFMPEG_LIMITS

    def describe(self) -> str:
        declared = f", {self.stream.frames} frames" if self.stream.frames else ""
        return f"video {self.location!r} ({self.stream.width}x{self.stream.height}{declared})"

    def _packets(self) -> Iterator[Any]:
        import av

        demux = self.container.demux(self.stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                return
            except (av.FFmpegError, OSError) as exc:
                self.stats.skip(f"video {self.location!r} ended early ({_reason(exc)})")
                return
            yield packet

    def _decoded(self) -> Iterator[np.ndarray]:
        import av

        for packet in self._packets():
            try:
                pictures = packet.decode()
            except (av.FFmpegError, ValueError) as exc:
                self.stats.skip(f"video {self.location!r}: a frame failed to decode ({_reason(exc)})")
                continue
            for picture in pictures:
                yield picture.to_ndarray(format="rgb24")

    def __iter__(self) -> Iterator[Frame]:
        try:
            for image in self._decoded():
                if self.limit is not None and self.stats.decoded >= self.limit:
                    return
                self.stats.decoded += 1
                yield Frame(self.fmt.prepare(self.fmt.capture(image)), None, f"video:{self.stats.decoded}")
            missing = (self.stream.frames or 0) - self.stats.decoded - self.stats.skipped
            if missing > 0 and self.limit is None:
                self.stats.skip(f"video {self.location!r} ended {missing} frames before its declared length", missing)
        finally:
            self.container.close()


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] or type(exc).__name__


def open_source(text: str, fmt: FrameFormat, limit: int | None = None) -> Any:
    """The frame source a `--source` argument names: `/dev/videoN` (a camera), an existing
    directory (an image folder), an existing file (a video), else a dataset name. DataError
    naming the argument when it is none of these. O(files) for a folder, O(1) otherwise."""
    if text.startswith("/dev/video"):
        return VideoSource(text, fmt, limit)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, fmt, limit)
    if path.is_file():
        return VideoSource(text, fmt, limit)
    try:
        return DatasetSource(text, fmt, limit)
    except DataError as exc:
        if path.suffix.lower() in VIDEO_SUFFIXES or "/" in text and ":" not in text:
            raise DataError(f"--source {text!r}: no such file or directory") from None
        raise DataError(
            f"--source {text!r}: not a directory, a video file, a camera (/dev/videoN) or a dataset ({exc})"
        ) from None
