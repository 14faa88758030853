"""Time ``core.brush_rle`` against the Label Studio SDK's brush RLE on 512×512 masks.

Two cases:

- ``tumour``: the largest tumour slice of the IBSI STS_001 T1 mask, upsampled
  (nearest neighbour) to fit 512 pixels and zero-padded to 512×512. This is the shape a
  real annotation has: a few hundred runs.
- ``noise``: 512×512 random pixels at 50 %, the worst case: about 131 000 runs.

For each case and each direction it prints the median wall time per call of ours and the
SDK's, and the speed-up. The outputs are checked for equality first. The timings themselves
are only printed, never asserted.

Usage::

    .venv/bin/python benchmarks/bench_brush_rle.py --repeat 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
from label_studio_sdk.converter import brush as sdk

from core.brush_rle import decode_rle, encode_rle

STS_MASK = Path("/work/shared/data/ibsi-sts-t1/STS_001/MR_T1_mask.nii.gz")
SIZE = 512


def tumour_mask(path: Path = STS_MASK, size: int = SIZE) -> np.ndarray:
    """Largest tumour slice of ``path``, upsampled to fit ``size`` and padded to ``size × size``."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # [z, y, x]
    z = int(np.argmax((volume > 0).sum(axis=(1, 2))))
    slice_ = (volume[z] > 0).astype(np.uint8)
    h, w = slice_.shape
    scale = size / max(h, w)
    new_w, new_h = min(size, round(w * scale)), min(size, round(h * scale))
    resized = cv2.resize(slice_, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def noise_mask(seed: int, size: int = SIZE) -> np.ndarray:
    """Random pixels, half foreground: the most runs a mask of this size can have, roughly."""
    return (np.random.default_rng(seed).random((size, size)) < 0.5).astype(np.uint8)


def calls_per_sample(fn: Callable[[], object], min_sample_s: float) -> int:
    """How many calls of ``fn`` make one timed sample last at least ``min_sample_s`` (also warms up)."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_sample_s:
            return calls
        calls = max(2 * calls, math.ceil(calls * min_sample_s / max(elapsed, 1e-9)))


def median_pair(
    sdk_fn: Callable[[], object], our_fn: Callable[[], object], repeat: int, min_sample_s: float = 0.02
) -> tuple[float, float]:
    """Median seconds per call of the SDK's function and ours, sampled alternately.

    Fast calls are timed in batches (a sample lasts at least ``min_sample_s``) so the timer's
    resolution does not matter. The two are sampled in turn so that a change in machine load
    affects both alike.
    """
    n_sdk = calls_per_sample(sdk_fn, min_sample_s)
    n_ours = calls_per_sample(our_fn, min_sample_s)
    sdk_times, our_times = [], []
    for _ in range(repeat):
        for fn, n, times in ((sdk_fn, n_sdk, sdk_times), (our_fn, n_ours, our_times)):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - start) / n)
    return statistics.median(sdk_times), statistics.median(our_times)


def bench_case(name: str, mask: np.ndarray, repeat: int) -> list[tuple[str, str, int, float, float]]:
    """Check ours against the SDK on ``mask`` and return ``(case, op, rle bytes, sdk s, ours s)`` rows."""
    h, w = mask.shape
    sdk_input = (mask > 0).astype(np.uint8) * 255
    rle = encode_rle(mask)
    sdk_rle = sdk.mask2rle(sdk_input)
    assert rle == sdk_rle, f"{name}: encode_rle differs from mask2rle"
    decoded = decode_rle(sdk_rle, h, w)
    sdk_decoded = (sdk.decode_rle(sdk_rle).reshape(h, w, 4)[:, :, 3] > 0).astype(np.uint8)
    assert np.array_equal(decoded, sdk_decoded), f"{name}: decode_rle differs from the SDK's decode_rle"
    assert np.array_equal(decoded, mask > 0), f"{name}: round trip lost pixels"

    def sdk_decode() -> np.ndarray:
        return sdk.decode_rle(sdk_rle).reshape(h, w, 4)[:, :, 3]

    sdk_enc, our_enc = median_pair(lambda: sdk.mask2rle(sdk_input), lambda: encode_rle(mask), repeat)
    sdk_dec, our_dec = median_pair(sdk_decode, lambda: decode_rle(rle, h, w), repeat)
    return [(name, "encode", len(rle), sdk_enc, our_enc), (name, "decode", len(rle), sdk_dec, our_dec)]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run both cases, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed samples per measurement (median shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise mask")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    tumour = tumour_mask()
    cases = [
        (f"tumour {SIZE}x{SIZE} ({int(tumour.sum())} px)", tumour),
        (f"noise {SIZE}x{SIZE} (50 %)", noise_mask(args.seed)),
    ]
    rows = [row for name, mask in cases for row in bench_case(name, mask, args.repeat)]

    header = f"{'case':<30} {'op':<7} {'RLE bytes':>9} {'SDK ms':>10} {'ours ms':>9} {'speed-up':>9}"
    print(
        f"median time per call over {args.repeat} alternating samples;"
        " outputs checked identical to label_studio_sdk.converter.brush"
    )
    print(header)
    print("-" * len(header))
    for name, op, n_bytes, sdk_s, ours_s in rows:
        print(f"{name:<30} {op:<7} {n_bytes:>9} {sdk_s * 1e3:>10.2f} {ours_s * 1e3:>9.2f} {sdk_s / ours_s:>8.1f}x")


if __name__ == "__main__":
    main()
