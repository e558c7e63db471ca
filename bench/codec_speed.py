"""How long does the v2 tensor codec take, next to the uplink time of the same bytes?

Encode + decode of one request per wire dtype and size, median wall time, and its ratio to the
time those bytes take on a 4G uplink (5.85 Mbit/s): the codec should cost a small fraction of
the transfer it prepares. (tests/test_wire.py bounds the CPU time of the 1 MB FP32 case.)

    python bench/codec_speed.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dapdee import wire
from dapdee.netem import NETWORKS

SIZES = (1 << 14, 1 << 18, 1 << 20)  # float32 elements: 64 kB, 1 MB, 4 MB


def round_trip_ms(t: torch.Tensor, wire_dtype: str, repeats: int) -> tuple[float, int]:
    """Median ms of encode + decode, and the body's byte count."""
    samples = []
    nbytes = 0
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        body, h = wire.encode_request({"t": t}, wire_dtype=wire_dtype)
        wire.decode_request(body, int(h[wire.HEADER_LENGTH]))
        samples.append((time.perf_counter() - t0) * 1000)
        nbytes = len(body)
    return statistics.median(samples[1:]), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rate = NETWORKS["4G"]
    print(f"{'elements':>9} {'dtype':>5} {'body kB':>8} {'codec ms':>9} {'4G ms':>9} {'codec/4G':>9}")
    for n in SIZES:
        t = torch.randn(n, generator=torch.Generator().manual_seed(0))
        for dt in wire.WIRE_DTYPES:
            ms, nbytes = round_trip_ms(t, dt, args.repeats)
            uplink = nbytes * 8 / (rate * 1000)
            print(f"{n:9d} {dt:>5} {nbytes / 1000:8.1f} {ms:9.3f} {uplink:9.1f} {ms / uplink:9.2%}")


if __name__ == "__main__":
    main()
