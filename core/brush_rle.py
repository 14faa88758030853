"""Label Studio's brush RLE: encode a 2-D mask, decode it back, wrap it in a result.

Label Studio stores a brush annotation as the RGBA pixels of the mask (``H × W × 4`` bytes,
row-major) packed with thi.ng's ``rle-pack`` bit format, sent as a list of byte values. The
bit stream (most significant bit first) is:

- a header: the number of values ``num`` (32 bits), ``word_size - 1`` (5 bits) and four
  run-length field widths ``rle_sizes[k] - 1`` (4 bits each);
- then tokens until ``num`` values are produced. Each token is a flag bit ``x``, a 2-bit
  index ``k`` into ``rle_sizes`` and a ``rle_sizes[k]``-bit field ``n - 1``. If ``x`` is 1 the
  token is a *repeat*: one word that fills ``n`` values. If ``x`` is 0 it is a *literal*:
  ``n`` words follow, one per value;
- then zero bits up to a whole byte.

``encode_rle`` gives the same bytes as ``label_studio_sdk.converter.brush.mask2rle``
(``word_size`` 8, ``rle_sizes`` ``[3, 4, 8, 16]``, a single value written as a 1-value literal,
runs longer than 65 536 split into 65 536-value tokens, and always 1 to 8 padding bits so a
stream whose length is a multiple of 8 gets a whole zero byte). It needs no loop in
Python at all. ``decode_rle`` reads any valid ``rle-pack`` stream (any word size and field
widths, literals of any length, as the Label Studio front end writes them). Tokens have
variable lengths, so where each one starts depends on all the ones before it. Only that
pointer chase (one list look-up per token) runs in Python: each token's length is computed
for every bit position at once with numpy. The SDK's reference code builds a string of
``'0'``/``'1'`` characters and walks it bit by bit in Python. ``benchmarks/bench_brush_rle.py``
compares the two on 512×512 masks.

Masks are numpy arrays indexed ``[y, x]``. A result's ``original_height`` is ``y`` and
``original_width`` is ``x``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import BrushDecodeError

__all__ = ["brush_result_to_mask", "decode_rle", "encode_rle", "mask_to_brush_result"]

CHANNELS = 4
"""Label Studio's brush stores RGBA: each mask pixel is 4 values (all equal when we encode)."""

FOREGROUND_VALUE = 255
"""Value given to the four channels of a foreground pixel (what ``mask2rle`` expects)."""

_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_HEADER_PARAMS = (_WORD_SIZE - 1) << 16 | sum((size - 1) << (12 - 4 * k) for k, size in enumerate(_RLE_SIZES))
"""The 21 header bits after the value count: ``word_size - 1`` then each ``rle_sizes[k] - 1``."""
_MAX_RUN = 1 << 16
"""Largest run one token can hold with a 16-bit length field."""

_KIND_LIMITS = np.array([1, 8, 16, 256], dtype=np.int64)
"""Longest run of each token kind but the last; ``np.searchsorted`` gives a run's kind.

Kind 0 is a single value, written as a 1-value literal. Kinds 1 to 4 are repeats with a
length field of 3, 4, 8 or 16 bits (``_RLE_SIZES`` classes 0 to 3)."""
_TOKEN_BITS = np.array([3 + _RLE_SIZES[0] + _WORD_SIZE] + [3 + size + _WORD_SIZE for size in _RLE_SIZES])
"""Bits of a token of each kind: flag, class, length field, one word."""
_TOKEN_PREFIX = np.array(
    [0] + [((1 << (2 + size)) | (k << size)) << _WORD_SIZE for k, size in enumerate(_RLE_SIZES)]
) - (1 << _WORD_SIZE)
"""Flag and class bits of a token of each kind, shifted into place above the field and word,
minus 1 in the length field: a token's code is ``(L << 8) + value + _TOKEN_PREFIX[kind]``."""
_FIVE = np.arange(5, dtype=np.int64)
_WINDOW_SHIFTS = np.array([32, 24, 16, 8, 0], dtype=np.uint64)

_BLOCK_BITS = 1 << 21
"""Bit positions whose token lengths ``decode_rle`` computes at once (bounds its memory)."""


# --------------------------------------------------------------------------- encoding


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask as a Label Studio brush RLE.

    The result equals ``label_studio_sdk.converter.brush.mask2rle((mask > 0).astype(np.uint8)
    * 255)`` byte for byte for a mask without negative values. This matters because Label
    Studio and the SDK decode our RLE with their own code, and tests compare against the
    SDK's output directly. Runs are found on the mask itself, not on the 4× larger RGBA array,
    and the tokens are packed into bytes in one vectorised pass.

    Args:
        mask: 2-D array ``[y, x]``, bool or numeric. Any nonzero value, NaN included, is
            foreground.

    Returns:
        The RLE as a list of ints in ``0..255``, ready for a JSON result.

    Raises:
        ValueError: If ``mask`` is not 2-D, is empty, or has too many pixels for the format's
            32-bit value count.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"brush RLE needs a 2-D mask [y, x], got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"brush RLE needs a non-empty mask, got shape {m.shape}")
    num = m.size * CHANNELS
    if num >= 1 << 32:
        raise ValueError(f"mask of shape {m.shape} is too large for brush RLE (2**32 values at most)")

    fg = (m != 0).ravel()
    change = np.flatnonzero(fg[1:] != fg[:-1])
    last = np.empty(change.size + 1, dtype=np.int64)  # last pixel of each run
    last[:-1] = change
    last[-1] = fg.size - 1
    lengths = np.empty_like(last)
    lengths[0] = last[0] + 1
    np.subtract(last[1:], last[:-1], out=lengths[1:])
    lengths *= CHANNELS
    values = np.zeros_like(last)
    values[0 if fg[0] else 1 :: 2] = FOREGROUND_VALUE  # runs alternate between the two values
    return _encode_runs(num, lengths, values)


def _encode_runs(num: int, lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """Pack runs as the SDK's ``encode_rle`` does (word size 8, field widths 3, 4, 8, 16).

    Kept apart from ``encode_rle`` so the tests can check it against the SDK on arrays that
    are not repeated RGBA, which have runs of length 1.

    Args:
        num: Total number of values (the sum of ``lengths``), written in the header.
        lengths: Run lengths, each at least 1.
        values: Value of each run, in ``0..255``.

    Returns:
        The packed bytes as a list of ints.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    # Token kind of each run: 0 for a single value (a 1-value literal), else 1 + the class of
    # the smallest length field that holds L - 1 (a repeat); runs above 256 use 16 bits.
    kind = np.searchsorted(_KIND_LIMITS, lengths)
    # A run longer than 65 536 is split: the SDK writes (L - 1) // 65536 full tokens of 65536
    # and then the rest, 1..65536 long, still a 16-bit repeat (its kind is the run's).
    if int(lengths.max()) > _MAX_RUN:
        extra = (lengths - 1) >> 16
        per_run = extra + 1
        run_of_token = np.repeat(np.arange(lengths.size), per_run)
        k = np.arange(run_of_token.size) - (np.cumsum(per_run) - per_run)[run_of_token]
        rest = lengths - extra * _MAX_RUN
        lengths = np.where(k < extra[run_of_token], _MAX_RUN, rest[run_of_token])
        kind, values = kind[run_of_token], values[run_of_token]

    # One code per token: flag, class, length field L - 1, then the 8-bit value.
    codes = lengths << _WORD_SIZE
    codes += values
    codes += _TOKEN_PREFIX[kind]  # includes the - 1 of the length field
    return _pack_codes(num, codes.view(np.uint64), _TOKEN_BITS[kind]).tolist()


def _pack_codes(num: int, codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Write the header, then variable-width codes (each at most 33 bits), MSB-first, as bytes.

    Each code is shifted into a 40-bit window that starts at the byte holding its first bit
    and split into 5 bytes. Codes occupy disjoint bits, so summing the contributions to each
    byte (``np.bincount``, exact in float64 for these small values) is the same as OR-ing
    them. Padding follows the SDK: 1 to 8 zero bits, so the length is ``total_bits // 8 + 1``.

    Args:
        num: The value count written in the header.
        codes: Code values, right-aligned, as uint64.
        widths: Bit width of each code.

    Returns:
        The bytes as a uint8 array.
    """
    ends = np.cumsum(widths)
    ends += _HEADER_BITS
    n_bytes = int(ends[-1]) // 8 + 1
    first_byte = (ends - widths) >> 3
    # 40 - width - (offset % 8) == 40 - end + 8 * first_byte
    shift = first_byte * 8
    shift += 40
    shift -= ends
    window = codes << shift.view(np.uint64)
    parts = (window >> _WINDOW_SHIFTS[:, None]) & np.uint64(0xFF)
    packed = np.bincount(
        (first_byte + _FIVE[:, None]).ravel(), weights=parts.ravel().astype(np.float64), minlength=n_bytes + 5
    )
    # The 53 header bits fill bytes 0..5 and the top 5 bits of byte 6, where the first code
    # may already have put bits: add, as above.
    header = ((num << 21 | _HEADER_PARAMS) << 3).to_bytes(7, "big")
    packed[:7] += np.frombuffer(header, dtype=np.uint8)
    return packed[:n_bytes].astype(np.uint8)


# --------------------------------------------------------------------------- decoding


def decode_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE into a ``[y, x]`` mask.

    Like the SDK's ``decode_rle(rle).reshape(height, width, 4)[:, :, 3]``, it reads the
    alpha channel, which is the one Label Studio's brush draws with. Unlike the SDK, it fails
    loudly instead of returning a clipped or shifted mask when the RLE does not describe
    exactly ``height × width × 4`` values. That happens when the result's declared size does
    not match its RLE, and the mask would otherwise land on the wrong pixels.

    Args:
        rle: The RLE bytes, as a list of ints in ``0..255`` (JSON), ``bytes`` or a 1-D
            integer array.
        height: Number of rows (``original_height``).
        width: Number of columns (``original_width``).

    Returns:
        uint8 array of shape ``(height, width)``: 1 where the alpha word is nonzero, else 0.

    Raises:
        BrushDecodeError: If the RLE is not a byte sequence, its header declares a value count
            other than ``height × width × 4``, it ends before all values are decoded, or a
            run goes past the declared count.
    """
    if isinstance(height, bool) or isinstance(width, bool) or height <= 0 or width <= 0:
        raise BrushDecodeError(f"brush mask size must be positive, got height={height}, width={width}")
    data = _as_bytes(rle)
    total_bits = data.size * 8
    if total_bits < _HEADER_BITS:
        raise BrushDecodeError(f"brush RLE is truncated: {data.size} bytes, shorter than its 7-byte header")
    expected = height * width * CHANNELS
    num = int.from_bytes(data[:4].tobytes(), "big")
    if num != expected:
        raise BrushDecodeError(
            f"brush RLE decodes to {num} values but the declared size {height}×{width}×{CHANNELS} needs {expected}"
        )
    params = int.from_bytes(data[4:7].tobytes(), "big") >> 3  # the 21 bits after num
    word_size = (params >> 16) + 1
    rle_sizes = np.array([((params >> (12 - 4 * k)) & 0xF) + 1 for k in range(4)], dtype=np.uint32)

    buf = np.concatenate((data, np.zeros(8, dtype=np.uint8)))  # reads past the end see zeros
    win32 = _byte_windows32(buf)
    starts = _chase_tokens(win32, total_bits, num, word_size, rle_sizes)

    # Re-read the fields of the tokens actually on the chain.
    flag, field_bits, count = _token_fields(_top19_at(win32, starts), rle_sizes)
    produced = np.cumsum(count)
    last = int(np.searchsorted(produced, num))  # first token reaching num
    if last == produced.size:
        done = int(produced[-1]) if produced.size else 0
        raise BrushDecodeError(
            f"brush RLE is truncated: its {data.size} bytes decode to {done} values, but its header"
            f" and the declared size {height}×{width}×{CHANNELS} need {num}"
        )
    if int(produced[last]) != num:
        raise BrushDecodeError(
            f"brush RLE is malformed: a run ends at value {int(produced[last])}, past the"
            f" declared {num} values ({height}×{width}×{CHANNELS})"
        )
    keep = slice(0, last + 1)
    starts, flag, field_bits, count = starts[keep], flag[keep], field_bits[keep], count[keep]
    word_start = starts + 3 + field_bits
    tok_bits = 3 + field_bits + np.where(flag, 1, count) * word_size
    end_bit = int(starts[-1] + tok_bits[-1])
    if end_bit > total_bits:
        raise BrushDecodeError(
            f"brush RLE is truncated: its last run needs {end_bit} bits but it has {total_bits}"
            f" ({data.size} bytes) for the declared size {height}×{width}×{CHANNELS}"
        )

    # One segment per repeat token (n values) and one per literal word (1 value each).
    n_segments = np.where(flag, 1, count)
    if flag.all():
        seg_pos, seg_len = word_start, count
    else:
        tok_of_seg = np.repeat(np.arange(starts.size), n_segments)
        k = np.arange(tok_of_seg.size) - (np.cumsum(n_segments) - n_segments)[tok_of_seg]
        seg_pos = word_start[tok_of_seg] + k * word_size
        seg_len = np.where(flag[tok_of_seg], count[tok_of_seg], 1)
    seg_fg = (_read_bits(buf, seg_pos, word_size) != 0).view(np.uint8)
    # Pixel j is foreground if value 4j + 3 (its alpha) is. A segment of values [a, b) holds
    # the alpha of pixels a // 4 .. b // 4 - 1, so repeat each segment that many pixels.
    pixel_ends = np.cumsum(seg_len) // CHANNELS
    return np.repeat(seg_fg, np.diff(pixel_ends, prepend=0)).reshape(height, width)


def _as_bytes(rle: Sequence[int]) -> np.ndarray:
    """Validate the RLE and return it as a 1-D uint8 array.

    ``bytes(list)`` checks types and the 0..255 range in C, which matters for the ~10^5
    values of a noisy mask.
    """
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or not (np.issubdtype(rle.dtype, np.integer) or rle.dtype == bool):
            raise BrushDecodeError(
                f"brush RLE must be a 1-D sequence of ints, got an array of shape {rle.shape}, dtype {rle.dtype}"
            )
        if rle.size and (int(rle.min()) < 0 or int(rle.max()) > 255):
            raise BrushDecodeError("brush RLE values must be bytes in 0..255")
        return rle.astype(np.uint8)
    if isinstance(rle, str | int):
        raise BrushDecodeError(f"brush RLE must be a sequence of ints, got {type(rle).__name__}")
    try:
        raw = bytes(rle)
    except (TypeError, ValueError) as exc:
        raise BrushDecodeError(f"brush RLE must be a sequence of ints in 0..255: {exc}") from exc
    return np.frombuffer(raw, dtype=np.uint8)


def _byte_windows32(buf: np.ndarray) -> np.ndarray:
    """For each byte, the 32 bits starting there (big-endian). Needs 3 bytes of padding."""
    b = buf.astype(np.uint32)
    n = buf.size - 3
    return (b[:n] << 24) | (b[1 : n + 1] << 16) | (b[2 : n + 2] << 8) | b[3 : n + 3]


def _token_fields(top19: np.ndarray, rle_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flag, length-field width and value count of tokens whose first 19 bits are ``top19``.

    The flag (1 bit), class (2 bits) and length field (at most 16 bits) fit in 19 bits, which
    is all that a token's length depends on.
    """
    top19 = top19.astype(np.int64)
    flag = (top19 >> 18).astype(bool)
    field_bits = rle_sizes.astype(np.int64)[(top19 >> 16) & 3]
    count = ((top19 >> (16 - field_bits)) & ((1 << field_bits) - 1)) + 1
    return flag, field_bits, count


@functools.lru_cache(maxsize=8)
def _token_bits_table(word_size: int, rle_sizes: tuple[int, ...]) -> np.ndarray:
    """Token length in bits for each possible value of a token's first 19 bits (read-only).

    Built as 8 slices of 2**16, one per flag and class: a few milliseconds, once per process
    for each header (Label Studio always sends word size 8 and field widths 3, 4, 8, 16).
    """
    low16 = np.arange(1 << 16, dtype=np.int32)
    parts = []
    for top3 in range(8):
        size = rle_sizes[top3 & 3]
        count = (low16 >> (16 - size)) + 1
        repeat = top3 >= 4
        parts.append(3 + size + (np.full_like(low16, word_size) if repeat else count * word_size))
    table = np.concatenate(parts)
    table.flags.writeable = False
    return table


def _top19_at(win32: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """First 19 bits at each bit position in ``pos`` (a 32-bit window shifted by ≤ 7 keeps 25)."""
    return (win32[pos >> 3] << (pos & 7).astype(np.uint32)) >> np.uint32(13)


def _chase_tokens(win32: np.ndarray, total_bits: int, num: int, word_size: int, rle_sizes: np.ndarray) -> np.ndarray:
    """Bit positions of the tokens, from the header on, until ``num`` values or the data end.

    For a block of bit positions, the length of the token that *would* start at each one is
    looked up with numpy. Then the actual chain is followed through that table in Python, one
    look-up per token. Tokens past the last needed one (padding) may be included. The caller
    trims them and checks the count.
    """
    table = _token_bits_table(word_size, tuple(int(r) for r in rle_sizes))
    shifts = np.arange(8, dtype=np.uint32)
    starts: list[np.ndarray] = []
    produced = 0
    p = _HEADER_BITS
    while produced < num and p < total_bits:
        base = p
        block = min(_BLOCK_BITS, total_bits - base)
        first_byte = base >> 3
        n_bytes = ((base + block - 1) >> 3) - first_byte + 1
        # The 32 bits from every bit position of the block: each byte's window shifted by 0..7.
        windows = (win32[first_byte : first_byte + n_bytes, None] << shifts).ravel()
        skip = base & 7
        top19 = windows[skip : skip + block] >> np.uint32(13)
        nxt = table[top19]
        nxt += np.arange(block, dtype=np.int32)
        chain: list[int] = []
        append = chain.append
        step = memoryview(nxt)
        q = 0
        while q < block:
            append(q)
            q = step[q]
        local = np.asarray(chain, dtype=np.int64)
        starts.append(local + base)
        produced += int(_token_fields(top19[local], rle_sizes)[2].sum())
        p = base + q
    if not starts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(starts)


def _read_bits(buf: np.ndarray, pos: np.ndarray, n_bits: int) -> np.ndarray:
    """Read ``n_bits`` (1..32) MSB-first at each bit position in ``pos``. Reads 4 bytes past it."""
    b = pos >> 3
    window = np.zeros(pos.size, dtype=np.uint64)
    for k in range(5):
        window |= buf[b + k].astype(np.uint64) << np.uint64(32 - 8 * k)
    shift = (40 - n_bits - (pos & 7)).astype(np.uint64)
    return (window >> shift) & np.uint64((1 << n_bits) - 1)


# --------------------------------------------------------------------------- results


def mask_to_brush_result(
    mask: np.ndarray,
    *,
    from_name: str,
    to_name: str,
    label: str,
    score: float | None = None,
) -> dict[str, Any]:
    """Wrap a mask as a Label Studio ``brushlabels`` result (prediction or annotation).

    The size is stored next to the RLE because Label Studio needs it to place the mask, and
    ``brush_result_to_mask`` needs it to check the RLE.

    Args:
        mask: 2-D array ``[y, x]``. Nonzero is foreground.
        from_name: Name of the ``BrushLabels`` control in the labeling config.
        to_name: Name of the ``Image`` object it labels.
        label: The brush label, one of the control's ``Label`` values.
        score: Model confidence, stored as ``score`` when given (predictions).

    Returns:
        A JSON-ready dict with ``type`` ``"brushlabels"``, ``original_width``/``original_height``
        and ``value`` ``{"format": "rle", "rle": [...], "brushlabels": [label]}``.

    Raises:
        ValueError: If ``mask`` is not a non-empty 2-D array.
    """
    m = np.asarray(mask)
    rle = encode_rle(m)
    height, width = m.shape
    result: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }
    if score is not None:
        result["score"] = float(score)
    return result


def brush_result_to_mask(result: dict[str, Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode a Label Studio brush result back into a ``[y, x]`` mask.

    Accepts the RLE under ``value.rle`` (how Label Studio exports results) or a top-level
    ``rle`` (older exports, and what the SDK's converter reads).

    Args:
        result: One result dict of an annotation or prediction.
        height: Rows of the mask. Defaults to the result's ``original_height``.
        width: Columns of the mask. Defaults to the result's ``original_width``.

    Returns:
        uint8 array ``(height, width)`` with 1 for foreground.

    Raises:
        BrushDecodeError: If the result has no RLE, is not in ``rle`` format, has no size
            (and none is given), or its RLE does not decode to that size.
    """
    value = result.get("value")
    value = value if isinstance(value, dict) else {}
    fmt = value.get("format", "rle")
    if fmt != "rle":
        raise BrushDecodeError(f"brush result has value.format {fmt!r}; only 'rle' can be decoded")
    rle = value.get("rle", result.get("rle"))
    if rle is None:
        raise BrushDecodeError(
            f"brush result (from_name={result.get('from_name')!r}) has no RLE under 'value.rle' or 'rle'"
        )
    h = height if height is not None else result.get("original_height")
    w = width if width is not None else result.get("original_width")
    missing = [name for name, v in (("original_height", h), ("original_width", w)) if v is None]
    if missing:
        raise BrushDecodeError(
            f"brush result (from_name={result.get('from_name')!r}) has no {' or '.join(missing)};"
            " pass height/width explicitly"
        )
    try:
        h, w = int(h), int(w)
    except (TypeError, ValueError) as exc:
        raise BrushDecodeError(f"brush result size is not an integer: height={h!r}, width={w!r}") from exc
    return decode_rle(rle, h, w)
