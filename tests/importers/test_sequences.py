"""Choosing the axial T1 and T2 from header hints (importers.sequences)."""

from __future__ import annotations

from pathlib import Path

import pytest

from importers.dicom import SeriesInfo, discover_series
from importers.sequences import pick_series, score_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def series(description: str, orientation=AXIAL, **fields) -> SeriesInfo:
    info = SeriesInfo(uid=f"1.2.{abs(hash(description)) % 10**8}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                      description=description, orientation=orientation, rows=256, columns=256, n_frames=20)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_real_sts001_headers_are_told_apart(sts001: Path) -> None:
    found = [s for s in discover_series(sts001).values() if s.is_image]
    t1, ties1 = pick_series(found, "T1")
    t2, ties2 = pick_series(found, "T2")
    assert not ties1 and not ties2
    assert t1.description == "AXIAL SE T1 - RESEARCH"
    assert t2.description == "AXIAL SE T2 FAT SAT - RESEARCH"  # no TR/TE in these headers


@pytest.mark.parametrize(("description", "fields", "weighting"), [
    ("t1_tse_tra", {}, "T1"),
    ("AX T2 FS", {}, "T2"),
    ("t2_tirm_tra", {}, "T2"),
    ("AX SPIR", {"repetition_time_ms": 4200.0, "echo_time_ms": 90.0}, "T2"),
    ("Ax SE", {"repetition_time_ms": 500.0, "echo_time_ms": 12.0}, "T1"),
    ("AX STIR", {"scanning_sequence": "IR", "inversion_time_ms": 160.0}, "T2"),
])
def test_weighting_from_hints(description: str, fields: dict, weighting: str) -> None:
    score = score_series(series(description, **fields))
    assert (score.t1 > score.t2) == (weighting == "T1"), score


@pytest.mark.parametrize(("description", "orientation", "fields", "reason"), [
    ("COR T1", CORONAL, {}, "coronal"),
    ("3-plane localizer", AXIAL, {}, "localiser"),
    ("AX DWI b800", AXIAL, {}, "diffusion"),
    ("AX T1", AXIAL, {"image_type": "DERIVED\\SECONDARY\\MPR"}, "derived"),
])
def test_unsuitable_series_are_not_picked(description: str, orientation, fields: dict, reason: str) -> None:
    info = series(description, orientation, **fields)
    score = score_series(info)
    assert max(score.t1, score.t2) <= 1.0 and any(reason in r for r in score.reasons), score
    assert pick_series([info], "T1")[0] is None or reason == "derived"


def test_pre_contrast_t1_beats_post_contrast() -> None:
    pre, post = series("AX T1 SE"), series("AX T1 SE POST GD")
    assert pick_series([post, pre], "T1") == (pre, [])


def test_fat_sat_t2_beats_plain_t2() -> None:
    plain, fat_sat = series("AX T2 TSE"), series("AX T2 TSE FS")
    assert pick_series([plain, fat_sat], "T2") == (fat_sat, [])


def test_identical_candidates_are_reported_as_a_tie() -> None:
    a, b = series("AX T2 FS"), series("AX T2 FS ")
    best, ties = pick_series([a, b], "T2")
    assert best is a and ties == [b]
