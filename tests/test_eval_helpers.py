"""The benchmark's error breakdown must add up: every wrong voxel is counted once, under its cause."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_segmentation import ERROR_KINDS, propagation_errors


def test_wrong_voxels_are_split_by_cause():
    truth = np.zeros((6, 10, 10), bool)
    truth[1:5, 2:6, 2:6] = True  # tumour on slices 1-4
    result = np.zeros_like(truth)
    result[2:4, 2:6, 2:7] = True  # reached 2-3: one extra column each (over), nothing under
    result[3, 2:6, 2:4] = False  # ... minus 8 voxels on slice 3 (under)
    result[5, 0:2, 0:3] = True  # past the end: 6 voxels (beyond)
    errors = propagation_errors(result, truth)
    assert set(errors) == set(ERROR_KINDS)
    assert errors == {"missed": 32, "under": 8, "over": 8, "beyond": 6}  # slices 1 and 4 never reached
    assert sum(errors.values()) == int((result ^ truth).sum())
