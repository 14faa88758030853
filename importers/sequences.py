"""Telling the axial T1 and the axial T2 (fat-sat) apart from DICOM headers.

Real headers are inconsistent: TR/TE may be absent (as in the TCIA sarcoma data), and
descriptions are free text. Each series gets a score per weighting from several weak
hints; the best axial series wins, and a tie or no candidate is an error that lists the
series so the user can choose with ``--t1``/``--t2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from importers.dicom import SeriesInfo

_T1 = re.compile(r"T1(?![0-9])")
_T2 = re.compile(r"T2(?![0-9])")
_FAT_SAT = re.compile(r"FAT.?SAT|\bFS\b|_FS|FS_|SPIR|SPAIR|STIR|TIRM|FATSUP|\bFSE.?FS|DIXON.*W")
_CONTRAST = re.compile(r"\bGD\b|GAD|POST|\bC\+|\+C\b|CONTRAST|\bKM\b|DOTAREM|GADO")
_LOCALISER = re.compile(r"LOCALI[SZ]ER|SCOUT|SURVEY|\bLOC\b|3.?PLANE|TRI.?PILOT")
_NOT_ANATOMICAL = re.compile(r"\bDWI\b|DIFFUSION|\bADC\b|\bTRACE\b|\bPERF|\bDCE\b|\bSUB|MIP|MPR|\bT2\*|SWI|FLAIR")


@dataclass(frozen=True)
class SequenceScore:
    """How much a series looks like an axial T1 or T2, and why (shown to users)."""

    t1: float
    t2: float
    reasons: tuple[str, ...]


def score_series(info: SeriesInfo) -> SequenceScore:
    """Score one image series; non-axial, localiser and functional series score zero."""
    text = " ".join([info.description, info.protocol_name, info.sequence_name]).upper()
    reasons: list[str] = []
    if not info.is_image:
        return SequenceScore(0, 0, ("not an image series",))
    if info.plane != "axial":
        return SequenceScore(0, 0, (f"{info.plane}, not axial",))
    if _LOCALISER.search(text) or "LOCALIZER" in info.image_type.upper():
        return SequenceScore(0, 0, ("localiser",))
    if _NOT_ANATOMICAL.search(text):
        return SequenceScore(0, 0, ("diffusion/perfusion/derived series",))
    t1 = t2 = 0.0
    if _T1.search(text):
        t1 += 3
        reasons.append("description says T1")
    if _T2.search(text):
        t2 += 3
        reasons.append("description says T2")
    fat_sat = bool(_FAT_SAT.search(text)) or any(o in info.scan_options.upper().split("\\") for o in ("FS", "SFS"))
    if fat_sat:
        t2 += 1
        t1 -= 0.5
        reasons.append("fat-saturated")
    tr, te = info.repetition_time_ms, info.echo_time_ms
    if tr is not None and te is not None:
        if tr < 1000 and te < 30:
            t1 += 2
            reasons.append(f"short TR/TE ({tr:g}/{te:g} ms)")
        elif tr > 1500 and te > 60:
            t2 += 2
            reasons.append(f"long TR/TE ({tr:g}/{te:g} ms)")
    if "IR" in info.scanning_sequence.upper().split("\\") and info.inversion_time_ms and info.inversion_time_ms < 250:
        t2 += 1
        reasons.append("STIR")
    if _CONTRAST.search(text):
        t1 -= 1
        t2 -= 1
        reasons.append("post-contrast")
    if any(k in info.image_type.upper().split("\\") for k in ("DERIVED", "SECONDARY")):
        t1 -= 2
        t2 -= 2
        reasons.append("derived image")
    return SequenceScore(t1, t2, tuple(reasons))


def pick_series(series: list[SeriesInfo], weighting: str) -> tuple[SeriesInfo | None, list[SeriesInfo]]:
    """The best series for ``weighting`` (``T1``/``T2``) and the runners-up tied with it.

    Returns ``(None, [])`` when no series scores above zero; ``(best, ties)`` with a
    non-empty ``ties`` when the choice is ambiguous (the caller decides what to do).
    """
    key = weighting.lower()
    scored = [(getattr(score_series(s), key), s) for s in series]
    scored = [(value, s) for value, s in scored if value > 0]
    if not scored:
        return None, []
    scored.sort(key=lambda item: -item[0])
    best_value, best = scored[0]
    ties = [s for value, s in scored[1:] if value == best_value]
    return best, ties


def describe_candidates(series: list[SeriesInfo]) -> str:
    """One line per series, with its scores, for error messages."""
    lines = []
    for info in series:
        score = score_series(info)
        hints = ", ".join(score.reasons) or "no hints"
        lines.append(f"  - {info.summary()} [T1 {score.t1:g}, T2 {score.t2:g}: {hints}]")
    return "\n".join(lines) or "  (none)"
