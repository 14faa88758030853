"""Worker throughput of box-prompted pre-annotation: PNG decode → LiteMedSAM → brush RLE, slices/s.

What a ``preannotate`` worker does per slice, without Redis or Label Studio around it: decode the
slice's PNG, run the image encoder and the mask decoder in batches (``SliceSegmenter.segment_many``;
bfloat16 encoder on CUDA), post-process and encode Label Studio's brush RLE. Every tumour slice
(area ≥ 20 px) of the IBSI patients is prompted with its mask's box + 5 px, so the mean Dice printed
beside the speed must match ``eval_segmentation.py`` (a): a fast wrong answer would show there.

Data: IBSI ``ibsi-sts-t1`` (TCIA "Soft-tissue-Sarcoma", CC BY 3.0, Vallières et al. 2015,
DOI 10.7937/K9/TCIA.2015.7GO2GSKS), from the shared folder or from ``pack_ibsi.py``'s file
(``--packed``, what the GPU machine gets). Usage::

    .venv/bin/python benchmarks/bench_preannotate.py [--packed .devdata/ibsi.npz] [--batch-size 64] [--limit N]

``--views flip_x`` measures the same with the mirrored view averaged in (``SliceSegmenter.views``,
what GPU workers do for prompts by default): each slice goes through the encoder once per view.
The IBSI slices are small crops (about 160 px); ``--size 512`` enlarges them (and their masks and
boxes) to a clinical series' 512 px, where the host's share per slice (``--host``: preparing the
network input, post-processing, the RLE; runs without a GPU) grows about tenfold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from eval_segmentation import DEFAULT_DATA_DIR, DEFAULT_MIN_AREA_PX, dice, tight_box  # noqa: E402


def tumour_slices(patients, limit: int | None, size: int | None = None
                  ) -> tuple[list[bytes], list[np.ndarray], list[tuple]]:
    """PNG bytes (uint8, as the case store holds them), truth masks and boxes of every tumour slice;
    with ``size``, each slice enlarged so that its longer side has that many pixels (bilinear; the
    mask by nearest neighbour, the box drawn on the enlarged mask)."""
    from pack_ibsi import as_uint8

    pngs, masks, boxes = [], [], []
    for _, image, mask in patients:
        image8 = image if image.dtype == np.uint8 else as_uint8(image)
        for z in np.nonzero(mask.reshape(len(mask), -1).sum(1) >= DEFAULT_MIN_AREA_PX)[0]:
            pixels, truth = image8[z], mask[z]
            if size:
                scale = size / max(pixels.shape)
                wh = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
                pixels = cv2.resize(pixels, wh, interpolation=cv2.INTER_LINEAR)
                truth = cv2.resize(truth.astype(np.uint8), wh, interpolation=cv2.INTER_NEAREST).astype(bool)
            ok, png = cv2.imencode(".png", pixels)
            assert ok
            pngs.append(png.tobytes())
            masks.append(truth)
            boxes.append(tight_box(truth, 5))
    if limit:
        pngs, masks, boxes = pngs[:limit], masks[:limit], boxes[:limit]
    return pngs, masks, boxes


def run(segmenter, pngs: list[bytes], boxes: list[tuple], batch_size: int,
        **options: Any) -> tuple[list[np.ndarray], dict]:
    """One pass, as a worker would do it for a case: PNGs decoded on threads, then ``segment_many``
    with the brush RLE as its ``finish`` (on its helper threads, overlapped with the GPU); returns the
    masks (decoded back from the RLE, for the Dice check) and the seconds spent per stage.
    ``options`` go to ``segment_many`` (``cache_embeddings``, ``helper_threads``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from core.brush_rle import brush_result_to_mask, mask_to_brush_result

    def decode(png: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)

    def encode(mask: np.ndarray) -> dict:
        return mask_to_brush_result(mask, from_name="tumor", to_name="image", label="Tumor")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(decode, pngs))
    t1 = time.perf_counter()
    options.setdefault("cache_embeddings", False)  # pre-annotation stores no embeddings
    results = segmenter.segment_many(images, boxes, batch_size=batch_size, finish=encode, **options)
    t2 = time.perf_counter()
    masks = [brush_result_to_mask(result, *image.shape) for result, image in zip(results, images, strict=True)]
    return masks, {"png": t1 - t0, "model + RLE": t2 - t1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="only the first N tumour slices (CPU smoke runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help="enlarge every slice to this longer side first (512: a clinical series' grid)")
    parser.add_argument("--host", action="store_true",
                        help="only time the host's share per slice (network input, post-processing, RLE; "
                             "no model run, so no GPU needed) and exit")
    parser.add_argument("--views", default="none", metavar="NAMES",
                        help="other views of each slice averaged in (workers.slice_views names, e.g. flip_x; "
                             "default none: the slice alone)")
    parser.add_argument("--stages", action="store_true",
                        help="also time the model's stages apart: image encoder, decoder (embeddings cached), "
                             "post-processing (cut, components, holes)")
    parser.add_argument("--fp32-decoder", action="store_true",
                        help="the mask decoder in float32 (on CUDA it runs under bfloat16 autocast, "
                             "workers.segmentation.BATCHED_DECODER_BF16), to compare speed and Dice")
    parser.add_argument("--keep-embeddings", action="store_true",
                        help="also store every slice's embedding in the host's cache (a 2 MiB copy each), as "
                             "interactive use wants; pre-annotation alone does not (segment_many cache_embeddings)")
    parser.add_argument("--helper-threads", type=int, default=None, metavar="N",
                        help="segment_many's helper threads (default: 2 on a GPU, 0 on CPU); 0 runs the host's "
                             "share in turn on the calling thread, to see what the overlap is worth")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one more pass (cProfile) and print its N most expensive functions")
    parser.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                        help="also profile one more pass with torch.profiler: how long the GPU was busy against "
                             "the wall clock (a host-bound pass leaves it idle), and the N operators that kept it "
                             "busy longest (on CPU: the N most expensive operators)")
    parser.add_argument("--box-shrinks", default=None, metavar="PX,PX",
                        help="px each box is also shrunk by, as $STS_BOX_SHRINKS (default 2,4,6: four prompts a "
                             "slice; 0: the box alone, one prompt a slice, as the issue's 330 slices/s was measured)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the encoder and the box decoder from CUDA graphs ($STS_CUDA_GRAPHS=on)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms ($STS_CUDNN_BENCHMARK=on)")
    parser.add_argument("--latency", type=int, default=0, metavar="N",
                        help="also time N single-slice calls, first and with the embedding cached (in-process)")
    args = parser.parse_args(argv)

    import torch

    from core.errors import ConfigError
    from workers import segmentation
    from workers.embedding_cache import EmbeddingCache
    from workers.models import load_litemedsam
    from workers.segmentation import SliceSegmenter
    from workers.slice_views import parse_views, view_names, views_label

    try:
        views = parse_views(args.views, "--views")
    except ConfigError as exc:
        parser.error(str(exc))
    from pack_ibsi import dev_patients

    patients = dev_patients(args.packed, args.data_dir)
    pngs, truths, boxes = tumour_slices(patients, args.limit, args.size)
    if args.host:
        host_share(pngs, truths, boxes)
        return 0
    from workers.models.cuda_tuning import CUDA_GRAPHS_ENV, CUDNN_BENCHMARK_ENV

    for wanted, variable in ((args.cuda_graphs, CUDA_GRAPHS_ENV), (args.cudnn_benchmark, CUDNN_BENCHMARK_ENV)):
        if wanted:
            os.environ[variable] = "on"
    model = load_litemedsam()
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if args.fp32_decoder:
        segmentation.BATCHED_DECODER_BF16 = False
    options = {"cache_embeddings": args.keep_embeddings, "helper_threads": args.helper_threads}
    shrinks = segmentation.DEFAULT_BOX_SHRINKS_PX
    if args.box_shrinks is not None:
        try:
            shrinks = segmentation.parse_box_shrinks(args.box_shrinks, "--box-shrinks")
        except ConfigError as exc:
            parser.error(str(exc))

    def fresh() -> SliceSegmenter:  # an empty cache: every slice (and view) through the encoder
        return SliceSegmenter(model=model, cache=EmbeddingCache(1), views=views, box_shrinks=shrinks)

    # a full batch and the last, partial one: kernels, autotuning, and a CUDA graph for each size
    warm_up = args.batch_size + len(pngs) % args.batch_size
    run(fresh(), pngs[:warm_up], boxes[:warm_up], args.batch_size)
    totals = []
    for _ in range(args.repeats):
        segmenter = fresh()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        masks, seconds = run(segmenter, pngs, boxes, args.batch_size, **options)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        totals.append((time.perf_counter() - started, seconds))
    best, seconds = min(totals, key=lambda t: t[0])
    scores = [dice(m, t) for m, t in zip(masks, truths, strict=True)]
    print(f"{device}, {model.version}, batch {args.batch_size}, {len(pngs)} tumour slices of {len(patients)} "
          f"patients, best of {args.repeats}, views: {views_label(view_names(views))}"
          + (", decoder in float32" if args.fp32_decoder else "")
          + (", every embedding copied to the host's cache" if args.keep_embeddings else "")
          + (f", {args.helper_threads} helper threads" if args.helper_threads is not None else "")
          + (f", box shrinks {args.box_shrinks or 'none'} px" if args.box_shrinks is not None else "")
          + (", CUDA graphs" if args.cuda_graphs else "") + (", cuDNN autotuner" if args.cudnn_benchmark else ""))
    print(f"throughput {len(pngs) / best:.1f} slices/s (PNG decode → model → brush RLE; {best:.2f} s)")
    print("  per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    print(f"  sanity: mean Dice {np.mean(scores):.4f} (box + 5 px; eval_segmentation (a) on the same slices)")
    if args.stages:
        stages(model, pngs, boxes, args.batch_size)
    if args.profile:
        profile(fresh(), pngs, boxes, args.batch_size, args.profile, options)
    if args.kernel_profile:
        kernel_profile(fresh(), pngs, boxes, args.batch_size, args.kernel_profile, options)
    if args.latency:
        latency(model, pngs[: args.latency], boxes[: args.latency], views)
    return 0


def host_share(pngs: list[bytes], truths: list[np.ndarray], boxes: list[tuple]) -> None:
    """Milliseconds per slice of what ``segment_many`` leaves to the host (its helper threads on a
    GPU): the network input and key (``SliceSegmenter.prepare``), the post-processing (``clean``)
    and the brush RLE, with the true masks standing in for the model's. One helper thread keeps up
    with N slices/s only while its share stays under 1000/N ms."""
    from core.brush_rle import mask_to_brush_result
    from workers.models import load_litemedsam
    from workers.segmentation import SliceSegmenter
    from workers.slice_masks import check_box

    images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_UNCHANGED) for p in pngs]
    checked = [check_box(box, image.shape) for image, box in zip(images, boxes, strict=True)]
    segmenter = SliceSegmenter(model=load_litemedsam())  # for its version (the key); the model does not run
    steps = {
        "network input + key": lambda i: segmenter.prepare(images[i]),
        "post-processing": lambda i: segmenter.clean(truths[i], checked[i]),
        "brush RLE": lambda i: mask_to_brush_result(truths[i], from_name="tumor", to_name="image", label="Tumor"),
    }
    sizes = sorted({image.shape for image in images}, key=lambda s: s[0] * s[1])
    print(f"host's share per slice, {len(images)} slices of {sizes[0][1]}×{sizes[0][0]} to "
          f"{sizes[-1][1]}×{sizes[-1][0]} px, one thread:")
    total = 0.0
    for label, step in steps.items():
        started = time.perf_counter()
        for index in range(len(images)):
            step(index)
        per_slice = (time.perf_counter() - started) / len(images) * 1e3
        total += per_slice
        print(f"  {label:<22} {per_slice:6.2f} ms")
    print(f"  {'total':<22} {total:6.2f} ms (one helper thread: at most {1e3 / total:.0f} slices/s)")


def stages(model, pngs: list[bytes], boxes: list[tuple], batch_size: int) -> None:
    """Seconds of the encoder, the decoder and the post-processing of ``segment_many`` on the slice
    alone, each over all slices: where a faster pre-annotation has to look."""
    import torch

    from workers.embedding_cache import EmbeddingCache
    from workers.segmentation import SliceSegmenter
    from workers.slice_masks import check_box

    images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_UNCHANGED) for p in pngs]
    checked = [check_box(box, image.shape) for image, box in zip(images, boxes, strict=True)]
    segmenter = SliceSegmenter(model=model, cache=EmbeddingCache(len(images) + 1))
    cuda = model.device.type == "cuda"

    def timed(step) -> tuple[float, object]:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        value = step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, value

    encoder_s, _ = timed(lambda: segmenter.embed_many(images, batch_size=batch_size))
    decoder_s, logits = timed(lambda: [item for start in range(0, len(images), batch_size) for item in
                                       segmenter.box_logits_many(images[start : start + batch_size],
                                                                 checked[start : start + batch_size], batch_size)])
    post_s, _ = timed(lambda: [segmenter.box_mask(item, box) for item, box in zip(logits, checked, strict=True)])
    inputs = torch.from_numpy(np.stack([segmenter.prepare(image)[1] for image in images[:batch_size]]))[:, None]
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        batches = max(1, len(images) // batch_size)
        alone_s, _ = timed(lambda: [model.embed(inputs) for _ in range(batches)])
    n = len(images)
    print(f"  encoder alone, {batches} batches of {len(inputs)} already on the device: "
          f"{batches * len(inputs) / alone_s:.0f} slices/s (the ceiling of the encoder stage)")
    print(f"  stages over {n} slices: encoder {encoder_s:.2f} s ({n / encoder_s:.0f} slices/s), decoder with "
          f"{1 + len(segmenter.box_shrinks)} boxes each + logits to the slice grid {decoder_s:.2f} s, "
          f"post-processing {post_s:.2f} s")


def profile(segmenter, pngs: list[bytes], boxes: list[tuple], batch_size: int, top: int,
            options: dict[str, Any]) -> None:
    """cProfile of one pass: where the calling thread spends or waits its time (a GPU that waits on
    the host shows up as Python work here; waits on the GPU show up in the copies to the host)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run(segmenter, pngs, boxes, batch_size, **options)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print("  profile of one pass (calling thread, by own time):")
    print("\n".join("    " + line for line in out.getvalue().splitlines() if line.strip()))


def kernel_profile(segmenter, pngs: list[bytes], boxes: list[tuple], batch_size: int, top: int,
                   options: dict[str, Any]) -> None:
    """torch.profiler over one pass: the GPU's busy time (kernels and copies) against the wall clock,
    which tells a GPU-bound pass (busy near the wall) from a host-bound one, and the operators that
    kept it busy; on a CPU, the most expensive operators."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = segmenter.model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as profiler:
        started = time.perf_counter()
        run(segmenter, pngs, boxes, batch_size, **options)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = profiler.key_averages()
    if cuda:
        busy = sum(event.self_device_time_total for event in events) / 1e6
        print(f"  kernel profile of one pass: GPU busy {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%}; "
              f"the profiler slows the host, so the wall is longer than unprofiled)")
    else:
        print(f"  kernel profile of one pass ({wall:.2f} s wall):")
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=top,
                         max_name_column_width=48)
    print("\n".join("    " + line for line in table.splitlines() if line.strip()))


def latency(model, pngs: list[bytes], boxes: list[tuple], views: tuple = ()) -> None:
    """p50/p95 of one ``segment`` call on a new slice and on a cached one (what an interactive job runs)."""
    import torch

    from workers.segmentation import SliceSegmenter

    segmenter = SliceSegmenter(model=model, views=views)
    cuda = model.device.type == "cuda"
    first, cached = [], []
    for png, box in zip(pngs, boxes, strict=True):
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        for times, shift in ((first, 0), (cached, 1)):
            started = time.perf_counter()
            segmenter.segment(image, box=tuple(np.asarray(box) + shift))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    for label, times in (("first call (encoder + decoder)", first), ("cached embedding (decoder only)", cached)):
        ms = np.asarray(times) * 1000
        print(f"  {label}: p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms (n={ms.size})")


if __name__ == "__main__":
    raise SystemExit(main())
