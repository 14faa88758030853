"""``core.brush_rle`` must agree bit for bit with the Label Studio SDK's brush RLE.

The oracle is the installed ``label_studio_sdk.converter.brush`` (what Label Studio's own
converter runs): ``mask2rle`` for encoding and ``decode_rle`` for decoding. Nothing is mocked.
Streams that the SDK's encoder never writes (multi-value literals, other word sizes and field
widths, as Label Studio's front end may send) are built by a small bit writer here and
decoded by both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from label_studio_sdk.converter import brush as sdk

from core.brush_rle import _encode_runs, brush_result_to_mask, decode_rle, encode_rle, mask_to_brush_result
from core.errors import AnnotationError, BrushDecodeError

STS_MASK = Path("/work/shared/data/ibsi-sts-t1/STS_001/MR_T1_mask.nii.gz")


def sdk_encode(mask: np.ndarray) -> list[int]:
    """The SDK's RLE of a mask, foreground being ``mask > 0``."""
    return sdk.mask2rle((np.asarray(mask) > 0).astype(np.uint8) * 255)


def sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """The SDK's decoding of the alpha channel, as 0/1 uint8."""
    return (sdk.decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0).astype(np.uint8)


def assert_matches_sdk(mask: np.ndarray, *, sdk_decodes: bool = True) -> None:
    """Our RLE equals the SDK's, and decoding gives the mask back (also through the SDK)."""
    h, w = mask.shape
    expected_mask = (mask > 0).astype(np.uint8)
    ours = encode_rle(mask)
    theirs = sdk_encode(mask)
    assert ours == theirs, f"RLE differs from mask2rle for a {h}×{w} mask"
    assert all(type(v) is int for v in ours)
    decoded = decode_rle(ours, h, w)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (h, w)
    np.testing.assert_array_equal(decoded, expected_mask)
    if sdk_decodes:
        np.testing.assert_array_equal(sdk_decode(theirs, h, w), decoded)


def ellipse_mask(shape: tuple[int, int], rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """Union of ``n`` random rotated ellipses: a blob-like mask with long runs."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ay, ax = rng.uniform(2, h / 3), rng.uniform(2, w / 3)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        mask |= (u / ax) ** 2 + (v / ay) ** 2 <= 1
    return mask


class BitWriter:
    """Writes an ``rle-pack`` stream token by token (MSB first), like thi.ng's encoder."""

    def __init__(self, num: int, word_size: int = 8, rle_sizes: tuple[int, ...] = (3, 4, 8, 16)) -> None:
        self.bits: list[str] = []
        self.word_size = word_size
        self.rle_sizes = rle_sizes
        self.write(num, 32)
        self.write(word_size - 1, 5)
        for size in rle_sizes:
            self.write(size - 1, 4)

    def write(self, value: int, n_bits: int) -> None:
        self.bits.append(format(value, f"0{n_bits}b"))

    def _count(self, n: int) -> None:
        cls = next(k for k, size in enumerate(self.rle_sizes) if n - 1 < 1 << size)
        self.write(cls, 2)
        self.write(n - 1, self.rle_sizes[cls])

    def repeat(self, value: int, n: int) -> None:
        self.write(1, 1)
        self._count(n)
        self.write(value, self.word_size)

    def literal(self, values: list[int]) -> None:
        self.write(0, 1)
        self._count(len(values))
        for v in values:
            self.write(v, self.word_size)

    def to_bytes(self, extra_bytes: int = 0) -> list[int]:
        """Bytes of the stream: zero bits up to a whole byte, then ``extra_bytes`` zero bytes."""
        s = "".join(self.bits)
        s += "0" * (-len(s) % 8 + 8 * extra_bytes)
        return [int(s[i : i + 8], 2) for i in range(0, len(s), 8)]


# ------------------------------------------------------------------ encode = mask2rle


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (64, 64), (512, 512)])
def test_empty_and_full_masks_match_sdk(shape: tuple[int, int]) -> None:
    assert_matches_sdk(np.zeros(shape, dtype=np.uint8))
    assert_matches_sdk(np.ones(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (7, 13), (100, 37)])
def test_single_pixel_at_each_corner_matches_sdk(shape: tuple[int, int]) -> None:
    h, w = shape
    for y, x in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]:
        mask = np.zeros(shape, dtype=bool)
        mask[y, x] = True
        assert_matches_sdk(mask)
        assert_matches_sdk(~mask)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 64, 65, 16384, 16385, 32768, 32769, 40000])
def test_run_length_boundaries_match_sdk(n: int) -> None:
    """Runs of 4n values cross the 3/4/8/16-bit field limits and the 65 536-value token split."""
    row = np.ones((1, n), dtype=np.uint8)
    assert_matches_sdk(row)
    row[0, n // 2] = 0
    assert_matches_sdk(row)
    assert_matches_sdk(1 - row)


@pytest.mark.parametrize(
    ("shape", "density", "sdk_decodes"),
    [
        ((1, 1), 0.5, True),
        ((7, 13), 0.5, True),
        ((13, 7), 0.3, True),
        ((1, 31), 0.5, True),
        ((31, 1), 0.5, True),
        ((97, 101), 0.5, True),
        ((256, 256), 0.5, True),
        ((256, 256), 0.05, True),
        ((384, 512), 0.5, False),
        ((512, 512), 0.5, False),
    ],
)
def test_noise_masks_match_sdk(shape: tuple[int, int], density: float, sdk_decodes: bool) -> None:
    rng = np.random.default_rng([*shape, round(density * 100)])
    assert_matches_sdk(rng.random(shape) < density, sdk_decodes=sdk_decodes)


def test_large_noise_round_trip() -> None:
    """A stream of several million bits is scanned in blocks; tokens straddle their edges."""
    mask = np.random.default_rng(17).random((1024, 1100)) < 0.5
    rle = encode_rle(mask)
    assert len(rle) * 8 > 3 * 2**21
    np.testing.assert_array_equal(decode_rle(rle, *mask.shape), mask)


@pytest.mark.parametrize("shape", [(50, 80), (200, 300), (512, 512), (511, 383)])
def test_ellipse_blobs_match_sdk(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for _ in range(3):
        assert_matches_sdk(ellipse_mask(shape, rng))


def test_every_tumour_slice_of_sts_001_matches_sdk() -> None:
    if not STS_MASK.exists():
        pytest.skip(f"{STS_MASK} not present")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(STS_MASK)))  # [z, y, x]
    slices = [z for z in range(volume.shape[0]) if volume[z].any()]
    assert len(slices) > 10
    for z in slices:
        mask = volume[z]
        assert encode_rle(mask) == sdk_encode(mask), f"slice z={z}"
        np.testing.assert_array_equal(decode_rle(sdk_encode(mask), *mask.shape), mask > 0, err_msg=f"z={z}")
        np.testing.assert_array_equal(sdk_decode(encode_rle(mask), *mask.shape), mask > 0, err_msg=f"z={z}")


def test_any_dtype_nonzero_is_foreground() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, size=(40, 60))
    expected = sdk_encode(labels)
    for mask in (labels, labels.astype(np.uint8), labels.astype(np.float32) * 0.5, labels > 0):
        assert encode_rle(mask) == expected
    assert encode_rle(np.asfortranarray(labels)) == expected  # memory order does not matter
    assert encode_rle(labels[:, ::-1]) == sdk_encode(labels[:, ::-1])


def test_run_packer_matches_sdk_encode_rle_on_any_runs() -> None:
    """The packer behind ``encode_rle`` also matches the SDK where masks cannot reach.

    RGBA runs are multiples of 4; arbitrary arrays have single values (1-value literals) and
    runs of 65 536 k + 1 whose 1-value rest is still a 16-bit repeat.
    """
    rng = np.random.default_rng(19)
    arrays = [np.array([5]), np.array([0, 255, 0]), np.full(65537, 7), np.full(2 * 65536 + 1, 255)]
    for _ in range(30):
        n = int(rng.integers(1, 400))
        arrays.append(np.repeat(rng.integers(0, 256, n), rng.choice([1, 1, 2, 9, 17, 300, 70000], n)))
    for arr in arrays:
        lengths, _, values = sdk.base_rle_encode(arr)
        assert _encode_runs(arr.size, lengths, values) == sdk.encode_rle(arr)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((2, 3, 4)), np.zeros((0, 5))])
def test_encode_rejects_non_2d_or_empty(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mask"):
        encode_rle(bad)


# ------------------------------------------------------------------ decode = SDK decode_rle


@pytest.mark.parametrize(
    ("word_size", "rle_sizes"), [(8, (3, 4, 8, 16)), (8, (1, 2, 5, 9)), (4, (2, 6, 10, 16)), (16, (16, 1, 3, 7))]
)
def test_decode_general_streams_like_sdk(word_size: int, rle_sizes: tuple[int, ...]) -> None:
    """Multi-value literals, other word sizes and field widths decode as the SDK decodes them."""
    rng = np.random.default_rng(word_size * 100 + rle_sizes[0])
    h, w = 23, 37
    num = h * w * 4
    max_run = 1 << max(rle_sizes)
    max_value = min(255, (1 << word_size) - 1)
    writer = BitWriter(num, word_size, rle_sizes)
    done = 0
    while done < num:
        n = int(min(num - done, rng.integers(1, min(max_run, 300) + 1)))
        if rng.random() < 0.5:
            writer.repeat(int(rng.choice([0, max_value, rng.integers(0, max_value + 1)])), n)
        else:
            writer.literal([int(v) for v in rng.choice([0, max_value], size=n)])
        done += n
    for extra_bytes in (0, 1, 3):
        rle = writer.to_bytes(extra_bytes)
        np.testing.assert_array_equal(decode_rle(rle, h, w), sdk_decode(rle, h, w))


def test_decode_accepts_bytes_and_arrays() -> None:
    mask = ellipse_mask((60, 40), np.random.default_rng(3))
    rle = encode_rle(mask)
    for form in (rle, tuple(rle), bytes(rle), np.array(rle), np.array(rle, dtype=np.uint8)):
        np.testing.assert_array_equal(decode_rle(form, 60, 40), mask)


def test_decode_stream_without_padding() -> None:
    """Label Studio's front end pads only to a whole byte, so a stream may have no padding."""
    writer = BitWriter(4 * 4)  # 53 header bits
    writer.repeat(0, 4)  # 14 bits: pixel 0
    writer.repeat(255, 9)  # 15 bits: pixels 1 and 2, red of pixel 3
    writer.literal([7, 9, 0])  # 6 + 3 × 8 bits: the rest of pixel 3, alpha 0
    assert len("".join(writer.bits)) == 112
    rle = writer.to_bytes()
    assert len(rle) == 14
    np.testing.assert_array_equal(decode_rle(rle, 1, 4), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(sdk_decode(rle, 1, 4), [[0, 1, 1, 0]])


# ------------------------------------------------------------------ errors


def test_wrong_declared_size_raises() -> None:
    rle = encode_rle(np.ones((10, 20), dtype=bool))
    for h, w in [(11, 20), (20, 11), (1, 1)]:
        with pytest.raises(BrushDecodeError, match=r"decodes to 800 values .* needs"):
            decode_rle(rle, h, w)
    np.testing.assert_array_equal(decode_rle(rle, 20, 10), np.ones((20, 10)))  # same count is fine
    with pytest.raises(BrushDecodeError, match="positive"):
        decode_rle(rle, 0, 800)


@pytest.mark.parametrize("keep", [0, 3, 6, 8, 0.5, -2])
def test_truncated_rle_raises(keep: float) -> None:
    mask = np.random.default_rng(11).random((30, 40)) < 0.5
    rle = encode_rle(mask)
    cut = rle[: int(len(rle) * keep)] if isinstance(keep, float) else rle[:keep]
    with pytest.raises(BrushDecodeError, match="truncated"):
        decode_rle(cut, 30, 40)


def test_last_byte_is_data_unless_it_is_the_sdk_padding_byte() -> None:
    """The SDK pads with 1 to 8 zero bits: a whole zero byte when the bits fill the last byte.

    Dropping that byte loses nothing; dropping any other last byte cuts the last token.
    """
    rng = np.random.default_rng(13)
    seen_whole_padding_byte = 0
    for _ in range(200):
        runs = rng.integers(1, 70, size=rng.integers(1, 8))
        mask = (np.repeat(np.arange(runs.size) % 2, runs) == 1)[None, :]
        n_bits = 53 + sum(14 if 4 * r <= 8 else 15 if 4 * r <= 16 else 19 if 4 * r <= 256 else 27 for r in runs)
        rle = encode_rle(mask)
        assert len(rle) == n_bits // 8 + 1
        if n_bits % 8 == 0:
            seen_whole_padding_byte += 1
            assert rle[-1] == 0
            np.testing.assert_array_equal(decode_rle(rle[:-1], *mask.shape), mask)
        else:
            with pytest.raises(BrushDecodeError, match="truncated"):
                decode_rle(rle[:-1], *mask.shape)
    assert seen_whole_padding_byte > 5


def test_run_past_declared_count_raises() -> None:
    writer = BitWriter(4 * 2 * 2)
    writer.repeat(255, 12)
    writer.repeat(0, 8)  # 20 values for 16 declared
    with pytest.raises(BrushDecodeError, match="past the declared 16"):
        decode_rle(writer.to_bytes(), 2, 2)
    writer = BitWriter(4 * 2 * 2)
    writer.literal([255] * 17)
    with pytest.raises(BrushDecodeError, match="past the declared 16"):
        decode_rle(writer.to_bytes(), 2, 2)


@pytest.mark.parametrize(
    "bad",
    [[0, 0, 1, 300, 57, 27, 255], [-1] * 8, [1.5] * 8, "abcdefgh", 12, None, np.zeros((2, 8), dtype=int)],
)
def test_non_byte_rle_raises(bad: object) -> None:
    with pytest.raises(BrushDecodeError):
        decode_rle(bad, 1, 1)  # type: ignore[arg-type]


def test_corrupted_streams_raise_or_decode_like_sdk() -> None:
    """Random damage never gives an IndexError or a mask the SDK would not also give."""
    rng = np.random.default_rng(23)
    h, w = 9, 12
    clean = encode_rle(ellipse_mask((h, w), rng, n=2) ^ (rng.random((h, w)) < 0.2))
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(300):
        rle = list(clean)
        i = int(rng.integers(4, len(rle)))  # keep the header's value count
        rle[i] ^= 1 << int(rng.integers(0, 8))  # flip one bit
        if rng.random() < 0.3:
            rle = rle[: int(rng.integers(7, len(rle)))]
        try:
            ours = decode_rle(rle, h, w)
        except BrushDecodeError:
            outcomes["rejected"] += 1
            continue
        outcomes["decoded"] += 1
        assert ours.shape == (h, w) and set(np.unique(ours)) <= {0, 1}
        try:
            theirs = sdk_decode(rle, h, w)
        except (ValueError, IndexError, OverflowError):
            continue  # the SDK itself cannot read it (values wider than a byte, say)
        np.testing.assert_array_equal(ours, theirs)
    assert outcomes["decoded"] > 10 and outcomes["rejected"] > 10, outcomes


def test_brush_decode_error_is_an_annotation_error() -> None:
    assert issubclass(BrushDecodeError, AnnotationError)


# ------------------------------------------------------------------ results


def test_brush_result_round_trip() -> None:
    mask = ellipse_mask((120, 90), np.random.default_rng(5))
    result = mask_to_brush_result(mask, from_name="tumour", to_name="image", label="Tumour", score=0.87)
    assert result == {
        "from_name": "tumour",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 90,
        "original_height": 120,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": sdk_encode(mask), "brushlabels": ["Tumour"]},
        "score": 0.87,
    }
    np.testing.assert_array_equal(brush_result_to_mask(result), mask)
    assert json.loads(json.dumps(result)) == result  # plain JSON types only
    np.testing.assert_array_equal(brush_result_to_mask(json.loads(json.dumps(result))), mask)
    assert "score" not in mask_to_brush_result(mask, from_name="t", to_name="i", label="L")


def test_brush_result_variants() -> None:
    mask = np.zeros((5, 8), dtype=np.uint8)
    mask[1:3, 2:7] = 3
    result = mask_to_brush_result(mask, from_name="t", to_name="i", label="L")
    rle = result["value"]["rle"]
    # Top-level rle, as the SDK's converter reads it; explicit size when the result has none.
    flat = {"type": "brushlabels", "rle": rle, "brushlabels": ["L"]}
    np.testing.assert_array_equal(brush_result_to_mask(flat, 5, 8), mask > 0)
    np.testing.assert_array_equal(brush_result_to_mask({**result, "original_height": 8}, 5, 8), mask > 0)
    with pytest.raises(BrushDecodeError, match="original_height or original_width"):
        brush_result_to_mask(flat)
    with pytest.raises(BrushDecodeError, match="original_width"):
        brush_result_to_mask(flat, height=5)
    with pytest.raises(BrushDecodeError, match="no RLE"):
        brush_result_to_mask({"value": {"format": "rle"}, "original_height": 5, "original_width": 8})
    with pytest.raises(BrushDecodeError, match="decodes to 160 values"):
        brush_result_to_mask({**result, "original_width": 9})
    with pytest.raises(BrushDecodeError, match="format"):
        brush_result_to_mask({**result, "value": {**result["value"], "format": "png"}})
