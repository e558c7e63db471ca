"""Test images written to disk: PNGs encoded with PyAV (the library the device reads them with)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_png(path: Path, pixels: np.ndarray) -> None:
    """`pixels` (uint8 [H, W] grayscale or [H, W, 3] RGB) as a PNG at `path` (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "gray" if pixels.ndim == 2 else "rgb24"
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], fmt
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=fmt)
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
