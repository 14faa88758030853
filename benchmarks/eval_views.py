"""Which other views of a slice a box prompt should be averaged with (test-time augmentation).

LiteMedSAM's image encoder is neither mirror- nor rotation-invariant, so a box decoded on a flipped
or transposed slice (``workers.slice_views``) and mapped back errs elsewhere than on the slice
itself; ``SliceSegmenter.views`` averages such views' logits before the cut. Each view costs one more
image-encoder pass per slice (cached), so which views pay for themselves is measured here.

For every tumour slice (area ≥ 20 px) of the IBSI patients, the box prompts of
``eval_segmentation.py`` (a) (mask box + 5 px) and (b) (loose box; the same seed, hence the same
boxes) are decoded on the slice and on each candidate view, and the logits are kept apart (the box
and its shrunk boxes averaged as ``SliceSegmenter`` does). Sets of views are then scored by mean
slice Dice of their average, cut and post-processed exactly as ``segment`` does (``box_mask``).

The choice is honest about its data: a greedy forward selection on the first 12 patients (sorted by
name; the tuning half of earlier sessions) adds, one at a time, the view that raises the mean of (a)
and (b) most, and stops when none does; each step is then reported on the other 13 and on all 25.
Fixed sets (each view alone with the slice, the flips, the rotations, all eight) are printed for
reference. These are DEVELOPMENT figures (earlier prompting rules were tuned on the same patients).

Data: IBSI ``ibsi-sts-t1`` (TCIA "Soft-tissue-Sarcoma", CC BY 3.0: Vallières M, Freeman CR,
Skamene SR, El Naqa I. A radiomics model from joint FDG-PET and MRI texture features for the
prediction of lung metastases in soft-tissue sarcomas of the extremities. The Cancer Imaging
Archive (2015). DOI 10.7937/K9/TCIA.2015.7GO2GSKS), from the shared folder or from ``pack_ibsi.py``'s
file (``--packed``, what the GPU machine gets). Never try to re-identify anyone. Usage::

    .venv/bin/python benchmarks/eval_views.py --packed .devdata/ibsi.npz --json views.json   # GPU: ~1 min
    .venv/bin/python benchmarks/eval_views.py --patients 2 --views flip_x,transpose         # CPU smoke run
    .venv/bin/python benchmarks/eval_views.py --views rot180,antitranspose --cuts=-2,-1,-0.5,0   # the cut
    .venv/bin/python benchmarks/eval_views.py --packed .devdata/ibsi.npz --zoom   # zoomed views as candidates too

A zoomed view (``workers.slice_views.ZOOM_VIEWS``) crops a window around the box, so its embedding
serves that box only: its encoder pass is paid on every new box, where a whole-slice view's is paid
once per slice (and can be warmed ahead).

On two CPU cores each view of each slice costs about a second of encoder time (922 slices × 8 views
≈ 2 h); a GPU does all of it in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from eval_segmentation import DEFAULT_DATA_DIR, DEFAULT_SEED, dice, slice_prompts  # noqa: E402

TUNING_PATIENTS = 12
"""The first 12 patients (sorted by name) choose; the other 13 check, as in earlier sessions."""

PARTS = ("a", "b")


@dataclass(eq=False)
class SliceRecord:
    """One tumour slice's truth, its two boxes (pixel centres, checked) and each view's logits."""

    patient: str
    truth: np.ndarray
    boxes: dict[str, np.ndarray]
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # part → [views, H, W] float16


def record_slices(segmenter, patients, views, seed: int, batch_size: int) -> list[SliceRecord]:
    """Decode (a) and (b) on each slice and on each of ``views``; ``slice_prompts`` draws the boxes,
    so with the same seed they are ``eval_segmentation.py``'s."""
    from workers.slice_masks import check_box

    rng = np.random.default_rng(seed)
    records: list[SliceRecord] = []
    for name, image, mask in patients:
        started = time.perf_counter()
        arrays, mine = [], []
        for z, truth, tight, loose in slice_prompts(mask, rng):
            arrays.append(image[z])
            boxes = {"a": check_box(tight, truth.shape), "b": check_box(loose, truth.shape)}
            mine.append(SliceRecord(name, truth, boxes))
        for part in PARTS:
            boxes = [record.boxes[part] for record in mine]
            per_view = [segmenter.box_logits_many(arrays, boxes, batch_size, view) for view in (None, *views)]
            for index, record in enumerate(mine):
                record.logits[part] = np.stack([logits[index] for logits in per_view]).astype(np.float16)
        records.extend(mine)
        print(f"  {name}: {len(mine)} slices × {1 + len(views)} views [{time.perf_counter() - started:.1f} s]",
              flush=True)
    return records


def score(segmenter, records: list[SliceRecord], chosen: tuple[int, ...], pool: ThreadPoolExecutor
          ) -> dict[str, np.ndarray]:
    """Per-slice Dice of (a) and (b) with the logits of the ``chosen`` view indices (0 = the slice) averaged."""
    from workers.segmentation import average_views

    index = [0, *(i for i in chosen if i)]  # the slice's own first: it stands in outside a zoomed window

    def one(record: SliceRecord) -> tuple[float, float]:
        return tuple(dice(segmenter.box_mask(average_views(list(record.logits[part][index].astype(np.float32))),
                                             record.boxes[part]), record.truth) for part in PARTS)

    pairs = np.asarray(list(pool.map(one, records)))
    return {part: pairs[:, i] for i, part in enumerate(PARTS)}


def describe(chosen: tuple[int, ...], names: list[str], cut: float | None = None) -> str:
    """A set of view indices (0 = the slice) by name, and its cut when it is not the default."""
    from workers.slice_views import views_label

    return views_label(names[i] for i in chosen if i) + ("" if cut is None else f" cut at {cut:g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", type=Path, default=None, help="pack_ibsi.py's file instead of --data-dir")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--patients", type=int, default=None, help="only the first N patients (sorted by name)")
    parser.add_argument("--views", default=None, metavar="NAMES",
                        help="candidate views (comma-separated workers.slice_views names; default: all seven)")
    parser.add_argument("--zoom", action="store_true",
                        help="the eight zoomed views (zoom, zoom_rot180, ...: a window around the box) too")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="(b)'s jitter, as eval_segmentation.py")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per encoder call (64 on GPU, 1 on CPU)")
    parser.add_argument("--cuts", default="", metavar="LOGITS",
                        help="also score the slice alone and the chosen set cut at each of these logits "
                             "(comma-separated, e.g. -2,-1.5,-1,-0.5; the cut is chosen on the tuning patients)")
    parser.add_argument("--json", type=Path, default=None, help="write every scored set's figures here")
    args = parser.parse_args(argv)

    import torch

    from core.errors import ConfigError
    from workers.embedding_cache import EmbeddingCache
    from workers.models import load_litemedsam
    from workers.segmentation import SliceSegmenter
    from workers.slice_views import VIEWS, ZOOM_VIEWS, parse_views

    try:
        views = tuple(VIEWS.values()) if args.views is None else parse_views(args.views, "--views")
        if args.zoom:
            views = tuple(dict.fromkeys((*views, *ZOOM_VIEWS.values())))
        cuts = [float(cut) for cut in args.cuts.split(",") if cut.strip()]
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    from pack_ibsi import dev_patients

    patients = sorted(dev_patients(args.packed, args.data_dir), key=lambda p: p[0])[: args.patients]
    started = time.perf_counter()
    model = load_litemedsam()
    cuda = model.device.type == "cuda"
    batch_size = args.batch_size or (64 if cuda else 1)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    # one patient's slices, every view of them, stay cached while both boxes are decoded
    segmenter = SliceSegmenter(model=model, cache=EmbeddingCache(1024))
    print(f"DEVELOPMENT figures: {len(patients)} IBSI STS T1 patients, {model.version}, {device}; box prompts "
          f"averaged with the box shrunk by {list(segmenter.box_shrinks)} px, cut at {segmenter.box_cut:g}\n"
          "Data: TCIA Soft-tissue-Sarcoma (Vallières et al. 2015, DOI 10.7937/K9/TCIA.2015.7GO2GSKS), CC BY 3.0",
          flush=True)
    records = record_slices(segmenter, patients, views, args.seed, batch_size)
    recorded_s = time.perf_counter() - started
    names = ["slice", *(view.name for view in views)]
    tuning_names = {name for name, _, _ in patients[:TUNING_PATIENTS]}
    tuning = np.asarray([r.patient in tuning_names for r in records])
    halves = {"tuning": tuning, "check": ~tuning, "all": np.ones(len(records), bool)}
    results: dict[str, dict] = {}
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)

    def evaluate(chosen: tuple[int, ...], cut: float | None = None) -> dict:
        label = describe(chosen, names, cut)
        if label not in results:
            cutter = segmenter if cut is None else SliceSegmenter(model=model, box_shrinks=segmenter.box_shrinks,
                                                                  box_threshold=cut)
            per_slice = score(cutter, records, chosen, pool)
            row: dict = {"views": [names[i] for i in chosen if i]}
            for half, keep in halves.items():
                row[half] = {part: float(per_slice[part][keep].mean()) if keep.any() else float("nan")
                             for part in PARTS}
                row[half]["n"] = int(keep.sum())
            row["per_patient"] = {
                part: {name: float(per_slice[part][[r.patient == name for r in records]].mean())
                       for name, _, _ in patients} for part in PARTS}
            results[label] = row
        return results[label]

    def line(chosen: tuple[int, ...], cut: float | None = None) -> str:
        row = evaluate(chosen, cut)
        return (f"  {describe(chosen, names, cut):<58} " + "  ".join(
            f"{half} (a) {row[half]['a']:.4f} (b) {row[half]['b']:.4f}" for half in ("tuning", "check", "all")))

    print(f"\nslice Dice, mean; tuning = first {TUNING_PATIENTS} patients (n = {halves['tuning'].sum()} slices), "
          f"check = the other {len(patients) - min(TUNING_PATIENTS, len(patients))} (n = {halves['check'].sum()}), "
          f"all (n = {len(records)})")
    print("fixed sets:")
    fixed = [(0,), *((0, i) for i in range(1, len(names)))]
    named = {view: i for i, view in enumerate(names)}
    for group in (("flip_x", "flip_y", "rot180"), ("rot90", "rot180", "rot270")):
        if all(view in named for view in group):
            fixed.append((0, *sorted(named[view] for view in group)))
    fixed.append(tuple(range(len(names))))
    for chosen in dict.fromkeys(fixed):
        print(line(chosen), flush=True)

    print("greedy forward selection on the tuning patients (mean of (a) and (b)):")
    chosen: tuple[int, ...] = (0,)
    best = np.mean([evaluate(chosen)["tuning"][p] for p in PARTS])
    path = [describe(chosen, names)]
    while len(chosen) < len(names):
        trials = {i: np.mean([evaluate(tuple(sorted((*chosen, i))))["tuning"][p] for p in PARTS])
                  for i in range(1, len(names)) if i not in chosen}
        pick = max(trials, key=trials.get)
        if trials[pick] <= best:
            break
        chosen, best = tuple(sorted((*chosen, pick))), trials[pick]
        path.append(describe(chosen, names))
        print(line(chosen), flush=True)
    final = evaluate(chosen)
    base = evaluate((0,))
    for part in PARTS:
        gains = [final["per_patient"][part][p] - base["per_patient"][part][p] for p in final["per_patient"][part]]
        print(f"  ({part}) {path[-1]} against the slice alone: better on {sum(g > 0 for g in gains)} patients, "
              f"worse on {sum(g < 0 for g in gains)} (worst {min(gains):+.4f})")
    if cuts:
        print(f"cuts (the default is {segmenter.box_cut:g}), chosen on the tuning patients (mean of (a) and (b)):")
        for candidate in dict.fromkeys([(0,), chosen]):
            for cut in cuts:
                print(line(candidate, cut), flush=True)
            best_cut = max(cuts, key=lambda cut: np.mean([evaluate(candidate, cut)["tuning"][p] for p in PARTS]))
            print(f"  best cut for {describe(candidate, names)}: {best_cut:g}")
    print(f"recorded in {recorded_s:.0f} s ({segmenter.encoder_calls} encoder runs); "
          f"total {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"device": device, "model": str(model.version), "greedy_path": path,
                                   "sets": results}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
