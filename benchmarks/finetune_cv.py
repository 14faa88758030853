"""Patient-level cross-validation of fine-tuning LiteMedSAM's prompt encoder and mask decoder.

Figures (a) box + 5 px, (b) loose box and (d) propagation from the largest slice, as in
``eval_segmentation.py``, for the off-the-shelf model and for the model fine-tuned on the OTHER folds'
patients (``workers.finetune``): every figure is on patients the fine-tuned model never saw.
The prompting and propagation rules were chosen on the same 25 patients, so these remain
DEVELOPMENT figures.

Data: ``ibsi-sts-t1`` of the shared data folder; TCIA "Soft-tissue-Sarcoma" (CC BY 3.0):
Vallières M, Freeman CR, Skamene SR, El Naqa I. A radiomics model from joint FDG-PET and MRI texture
features for the prediction of lung metastases in soft-tissue sarcomas of the extremities. The Cancer
Imaging Archive (2015). DOI 10.7937/K9/TCIA.2015.7GO2GSKS. Never try to re-identify anyone.

Only the slices from 3 below to 3 above the tumour are used (the IBSI crops already stop 5 cm around
it); their embeddings come from the on-disk cache (computed and stored when missing). Usage::

    .venv/bin/python benchmarks/finetune_cv.py [--folds 5] [--epochs 2] [--max-samples N] [--json out.json]
    .venv/bin/python benchmarks/finetune_cv.py --train-all models/decoder.pt   # then STS_LITEMEDSAM_DECODER
    .venv/bin/python benchmarks/finetune_cv.py --ensemble --bag 2   # + mean of base and tuned; of 2 tuned
    .venv/bin/python benchmarks/finetune_cv.py --train-encoder --average-models --views rot180   # any two encoders
    .venv/bin/python benchmarks/finetune_cv.py --mask-prompts   # neighbour's outline as a dense prompt too
    .venv/bin/python benchmarks/finetune_cv.py --train-box-shrinks 2,4   # train on the shrunk-box average
    .venv/bin/python benchmarks/finetune_cv.py --train-neck   # the image encoder's neck learns too (CPU)
    .venv/bin/python benchmarks/finetune_cv.py --views flip_x   # + (a), (b) with the mirrored view averaged in
    .venv/bin/python benchmarks/finetune_cv.py --views rot180 --no-propagation   # (a), (b) only
    .venv/bin/python benchmarks/finetune_cv.py --save-models cv-models/   # keep each fold's decoder
    .venv/bin/python benchmarks/finetune_cv.py --load-models cv-models/   # score them again, no training

Saved fold decoders record their held-out patients; loading refuses a decoder whose fold differs from
the one it would be scored on, so an inference-time change can be compared on the same decoders
without ever scoring a decoder on a patient it was trained on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from eval_segmentation import (  # noqa: E402
    DEFAULT_DATA_DIR,
    DEFAULT_EMBEDDING_DIR,
    DEFAULT_MIN_AREA_PX,
    dice,
    inner_point,
    naive_chain,
    read_patient,
    slice_prompts,
)

MARGIN_SLICES = 3
"""Slices kept beyond each end of the tumour (where propagation must learn to stop)."""


def load_patients(data_dir: Path, names: list[str] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image [z, y, x], mask)`` cropped to the tumour's slices ± ``MARGIN_SLICES``."""
    folders = sorted(p for p in data_dir.glob("STS_*") if p.is_dir())
    out = []
    for folder in folders:
        if names and folder.name not in names:
            continue
        image, mask = read_patient(folder)
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        lo, hi = max(0, zs.min() - MARGIN_SLICES), min(len(mask) - 1, zs.max() + MARGIN_SLICES)
        out.append((folder.name, image[lo : hi + 1], mask[lo : hi + 1]))
    return out


def cache_neck_inputs(segmenter, patients, cache) -> None:
    """Put every slice's neck input (``workers.finetune.neck_inputs``) into ``cache`` and its base
    embedding into the segmenter's cache, one encoder pass per slice missing from either."""
    import torch
    from tqdm import tqdm

    from workers.finetune import neck_inputs

    todo = []
    for _, image, _ in patients:
        for z in range(len(image)):
            _, model_input, _, key = segmenter.prepare(image[z])
            if key not in cache:
                todo.append((key, model_input))
    for key, model_input in tqdm(todo, desc="neck inputs", unit="slice", leave=False):
        batch = torch.from_numpy(model_input)[None, None].expand(-1, 3, -1, -1)
        features, embedding = neck_inputs(segmenter.model, batch)
        cache.put(key, features[0])
        if key not in segmenter.cache:
            segmenter.cache.put(key, embedding[0])


def slice_items(segmenter, image: np.ndarray, mask: np.ndarray) -> list:
    """``SliceItem``s of one patient (embeddings computed into the cache when missing)."""
    from workers.finetune import SliceItem

    embedded = segmenter.embed_many(list(image))
    items = []
    for z, item in enumerate(embedded):
        items.append(
            SliceItem(
                key=item.key,
                frame=item.frame,
                mask=mask[z],
                above=mask[z + 1] if z + 1 < len(mask) else None,
                below=mask[z - 1] if z > 0 else None,
            )
        )
    return items


def evaluate(segmenter, patients, seed: int, propagation=None, propagate_too: bool = True) -> dict[str, list[float]]:
    """Per-slice Dice for (a) and (b), per-patient volume Dice for (d) (``propagation`` settings,
    default ``DEFAULT_PROPAGATION``; not with ``propagate_too=False``, for arms that change prompts only)."""
    from workers.propagation import DEFAULT_PROPAGATION, propagate

    propagation = propagation or DEFAULT_PROPAGATION
    no_likeness = dataclasses.replace(propagation, min_likeness=0.0)
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"a": [], "b": [], "d": [], "d0": []} if propagate_too else {"a": [], "b": []}
    for _, image, mask in patients:
        for z, truth, tight, loose in slice_prompts(mask, rng):
            scores["a"].append(dice(segmenter.segment(image[z], box=tight), truth))
            scores["b"].append(dice(segmenter.segment(image[z], box=loose), truth))
        if not propagate_too:
            continue
        seed_index = int(np.argmax(mask.reshape(len(mask), -1).sum(1)))
        result = propagate(image, seed_index, mask[seed_index], segmenter=segmenter, settings=propagation)
        scores["d"].append(dice(result, mask))
        result = propagate(image, seed_index, mask[seed_index], segmenter=segmenter, settings=no_likeness)
        scores["d0"].append(dice(result, mask))
        if propagation.mask_prompt > 0:  # what the mask prompt adds: the same model with boxes only
            boxes_only = dataclasses.replace(propagation, mask_prompt=0.0)
            result = propagate(image, seed_index, mask[seed_index], segmenter=segmenter, settings=boxes_only)
            scores.setdefault("d_box", []).append(dice(result, mask))
    return scores


def baselines(segmenter, patients) -> None:
    """Off-the-shelf only, on the same cropped volumes: one click per slice, and the naive chain."""
    from workers.propagation import propagate

    clicks, naive, ours = [], [], []
    for _, image, mask in patients:
        for z in np.nonzero(mask.reshape(len(mask), -1).sum(1) >= DEFAULT_MIN_AREA_PX)[0]:
            x, y = inner_point(mask[z])
            clicks.append(dice(segmenter.segment(image[z], points=[(x, y, True)]), mask[z]))
        seed_index = int(np.argmax(mask.reshape(len(mask), -1).sum(1)))
        naive.append(dice(naive_chain(segmenter, image, seed_index, mask[seed_index]), mask))
        ours.append(dice(propagate(image, seed_index, mask[seed_index], segmenter=segmenter), mask))
    print(f"(c) one click at the innermost pixel, slice Dice: mean {np.mean(clicks):.4f} (n={len(clicks)})")
    print(f"(d) naive chain (box of previous result + 5 px, until empty), volume Dice: mean {np.mean(naive):.4f}; "
          f"propagate: mean {np.mean(ours):.4f} (n={len(naive)})")


def train(base, items, args, fold_seed: int, label: str):
    """A fine-tuned copy of ``base`` trained on ``items``, with a progress bar.

    Prompts are drawn afresh every epoch (new box jitter). With ``--train-encoder`` the image
    encoder learns too, from the slices' network inputs; the copy then gets its own
    ``encoder_version`` so that no cached base embedding is ever used with it.
    """
    import torch
    from tqdm import tqdm

    from workers.finetune import make_samples, train_litemedsam

    kinds = tuple(k for k in args.kinds.split(",") if k)

    def draw(rng: np.random.Generator) -> list:
        samples = make_samples(items, rng, kinds=kinds, mask_prompts=args.mask_prompts,
                               box_shrinks=args.train_box_shrinks)
        if args.max_samples and len(samples) > args.max_samples:
            samples = [samples[i] for i in sorted(rng.choice(len(samples), args.max_samples, replace=False))]
        return samples

    if args.train_encoder:
        inputs = {item.key: torch.from_numpy(args.model_inputs[item.key]) for item in items}
    elif args.train_neck:
        inputs = {item.key: args.neck_cache.get(item.key) for item in items}
    else:
        inputs = {item.key: args.cache.get(item.key) for item in items}
    model = copy.deepcopy(base)
    bar = tqdm(total=1, desc=f"train {label}", unit="step", leave=False)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    report = train_litemedsam(model, draw, inputs, train_encoder=args.train_encoder, train_neck=args.train_neck,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              encoder_lr=args.encoder_lr, seed=fold_seed, progress=progress)
    bar.close()
    if args.train_encoder or args.train_neck:
        part = "encoder" if args.train_encoder else "neck"
        model.version = model.encoder_version = f"{base.version}-{label.replace(' ', '')}-{part}"
    return model, report


def fold_model(base, train_items, held_out_names: list[str], args, k: int):
    """Fold ``k``'s fine-tuned model: trained here (and saved with ``--save-models``) or, with
    ``--load-models``, read back after checking that it was held out from exactly these patients."""
    from workers.finetune import save_finetuned
    from workers.models import load_litemedsam

    if args.load_models is not None:
        path = args.load_models / f"fold{k}.pt"
        if not path.is_file():
            raise SystemExit(f"{path}: no saved decoder for fold {k} (train it with --save-models)")
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True).get("metadata", {})
        if bool(saved.get("train_neck")) != args.train_neck:
            raise SystemExit(f"{path}: train_neck={bool(saved.get('train_neck'))} when saved; run with the same flag")
        if sorted(saved.get("held_out", [])) != sorted(held_out_names):
            raise SystemExit(f"{path}: held out {saved.get('held_out')}, but fold {k} is {held_out_names}; "
                             "same --folds and patients as when it was saved?")
        return load_litemedsam(base.device, finetuned_path=path), None
    model, report = train(base, train_items, args, args.seed + k, f"fold {k}")
    if args.save_models is not None:
        save_finetuned(model, args.save_models / f"fold{k}.pt",
                       {"held_out": held_out_names, "fold": k, "folds": args.folds, "epochs": args.epochs,
                        "samples": report.samples, "lr": args.lr, "kinds": args.kinds,
                        "mask_prompts": args.mask_prompts, "train_box_shrinks": list(args.train_box_shrinks),
                        "train_neck": args.train_neck},
                       include_encoder=args.train_encoder, include_neck=args.train_neck)
    return model, report


def tuned_segmenter(model, args, patients):
    """A segmenter for a fine-tuned model: base embeddings from disk, a tuned encoder's in memory only
    (a tuned neck's computed from the cached neck inputs of ``patients``' slices)."""
    import torch

    from workers.embedding_cache import EmbeddingCache, embedding_key
    from workers.segmentation import SliceSegmenter

    if not (args.train_encoder or args.train_neck):
        return SliceSegmenter(model=model, cache=args.cache)
    segmenter = SliceSegmenter(model=model, cache=EmbeddingCache(8192))
    if args.train_neck:
        for _, image, _ in patients:
            for z in range(len(image)):
                _, model_input, _, base_key = args.base_segmenter.prepare(image[z])
                with torch.inference_mode():
                    embedding = model.image_encoder.neck(args.neck_cache.get(base_key).float())
                segmenter.cache.put(embedding_key(model_input, model.encoder_version), embedding)
    return segmenter


class AveragedSegmenters:
    """Box prompts for several segmenters with different image encoders (the off-the-shelf model and
    one whose encoder was fine-tuned): each one's logits averaged over its views, then over the
    segmenters, cut and cleaned as the first would. ``DecoderEnsemble`` needs one shared encoder;
    this is its benchmark-only counterpart, for ``--average-models`` (box prompts only)."""

    def __init__(self, members: list) -> None:
        self.members = members

    def segment(self, image, box) -> np.ndarray:
        from workers.segmentation import average_views
        from workers.slice_masks import as_slice, check_box

        array = as_slice(image)
        box_px = check_box(box, array.shape)
        per_member = [average_views([member.box_logits_many([array], [box_px], 1, view)[0]
                                     for view in (None, *member.views)]) for member in self.members]
        return self.members[0].box_mask(average_views(per_member), box_px)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only-folds", type=str, default="", help="comma-separated fold numbers to run (0-based)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-samples", type=int, default=0, help="subsample the training prompts (CPU budget)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=str, default="", help="comma-separated subset of patients")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--embedding-dir", type=Path, default=DEFAULT_EMBEDDING_DIR)
    parser.add_argument("--train-all", type=Path, default=None, help="train on all patients and save the decoder here")
    parser.add_argument("--baselines", action="store_true", help="off-the-shelf clicks and naive chain only")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--packed", type=Path, default=None, help="read the patients from pack_ibsi.py's .npz")
    parser.add_argument("--train-encoder", action="store_true", help="fine-tune the image encoder too (GPU)")
    parser.add_argument("--average-models", action="store_true",
                        help="also score (a) and (b) with the off-the-shelf and the fine-tuned model's logits "
                             "averaged (with --views: each one's views first), whatever was fine-tuned")
    parser.add_argument("--ensemble", action="store_true",
                        help="also score the mean of the off-the-shelf and fine-tuned decoders (DecoderEnsemble)")
    parser.add_argument("--bag", type=int, default=1,
                        help="also score the mean of this many fine-tuned decoders trained with other seeds")
    parser.add_argument("--kinds", default="tight,loose,neighbour", help="prompt kinds to train on")
    parser.add_argument("--train-box-shrinks", default="",
                        help="comma-separated px: train tight/loose prompts on the logits averaged with the box "
                             "shrunk by these, as SliceSegmenter.segment decodes them (e.g. 2,4; '' = one box)")
    parser.add_argument("--train-neck", action="store_true",
                        help="the image encoder's neck learns too, from cached inputs of the neck (CPU-friendly)")
    parser.add_argument("--encoder-lr", type=float, default=None,
                        help="learning rate of the encoder (or its neck); default lr / 4")
    parser.add_argument("--save-models", type=Path, default=None, help="write fold k's decoder to DIR/fold{k}.pt")
    parser.add_argument("--load-models", type=Path, default=None,
                        help="score the decoders saved with --save-models instead of training")
    parser.add_argument("--mask-prompts", action="store_true",
                        help="neighbour prompts carry the neighbour's outline as a dense mask prompt, and the "
                             "fine-tuned model propagates with it (PropagationSettings.mask_prompt)")
    parser.add_argument("--no-propagation", action="store_true",
                        help="score (a) and (b) only: for prompt-side changes, which leave (d) as it was")
    parser.add_argument("--views", default="none", metavar="NAMES",
                        help="also score (a) and (b) of both models with these views of each slice averaged in "
                             "(comma-separated workers.slice_views names, e.g. flip_x; SliceSegmenter.views; "
                             "propagation has its own mirrored view)")
    args = parser.parse_args(argv)
    from core.errors import ConfigError
    from workers.segmentation import parse_box_shrinks
    from workers.slice_views import parse_views

    try:
        args.train_box_shrinks = parse_box_shrinks(args.train_box_shrinks, "--train-box-shrinks")
        args.views = parse_views(args.views, "--views")
    except ConfigError as exc:
        parser.error(str(exc))
    if args.load_models is not None and (args.save_models is not None or args.bag > 1 or args.train_encoder):
        parser.error("--load-models scores saved decoders: no --save-models, --bag or --train-encoder with it")
    if args.train_neck and (args.train_encoder or args.mask_prompts):
        parser.error("--train-neck is the CPU alternative to --train-encoder, without --mask-prompts")
    if (args.ensemble or args.bag > 1) and (args.train_encoder or args.train_neck):
        parser.error("--ensemble and --bag need a decoder-only fine-tune (the members must share the image encoder)")

    import torch

    from workers.embedding_cache import DiskEmbeddingCache
    from workers.finetune import save_finetuned
    from workers.models import DecoderEnsemble, load_litemedsam
    from workers.models.litemedsam import MASK_PROMPT_LOGIT, precision_version
    from workers.propagation import DEFAULT_PROPAGATION
    from workers.segmentation import SliceSegmenter

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_litemedsam("cuda" if torch.cuda.is_available() else "cpu")
    args.cache = DiskEmbeddingCache(args.embedding_dir, precision_version(base), max_entries=4096)
    wanted_names = [p for p in args.patients.split(",") if p]
    from pack_ibsi import dev_patients

    patients = dev_patients(args.packed, args.data_dir, wanted_names)
    base_segmenter = args.base_segmenter = SliceSegmenter(model=base, cache=args.cache)
    if args.train_neck:
        args.neck_cache = DiskEmbeddingCache(args.embedding_dir, f"{base.encoder_version}-neck-input", max_entries=4096)
        cache_neck_inputs(base_segmenter, patients, args.neck_cache)
    items = {name: slice_items(base_segmenter, image, mask) for name, image, mask in patients}
    args.model_inputs = {}
    if args.train_encoder:
        for _, image, _ in patients:
            for z in range(len(image)):
                _, model_input, _, key = base_segmenter.prepare(image[z])
                args.model_inputs[key] = model_input.astype(np.float16)
    print(f"DEVELOPMENT figures, {len(patients)} IBSI patients, {args.folds}-fold patient-level CV, "
          f"base {base.version}, device {base.device}; embeddings ready in {time.perf_counter() - started:.0f} s",
          flush=True)

    if args.baselines:
        baselines(base_segmenter, patients)
        return 0
    if args.train_all is not None:
        model, report = train(base, [i for v in items.values() for i in v], args, args.seed, "all")
        save_finetuned(model, args.train_all, {"patients": [p[0] for p in patients], "epochs": args.epochs,
                                               "samples": report.samples, "lr": args.lr, "kinds": args.kinds,
                                               "mask_prompts": args.mask_prompts,
                                               "train_box_shrinks": list(args.train_box_shrinks)},
                       include_encoder=args.train_encoder, include_neck=args.train_neck)
        print(f"saved {args.train_all} ({report.samples} prompts, {report.steps} steps, "
              f"final loss {np.mean(report.losses[-20:]):.3f})")
        return 0

    tuned_propagation = None
    if args.mask_prompts:
        tuned_propagation = dataclasses.replace(DEFAULT_PROPAGATION, mask_prompt=MASK_PROMPT_LOGIT)
    names = [p[0] for p in patients]
    folds = [[n for i, n in enumerate(names) if i % args.folds == k] for k in range(args.folds)]
    wanted = [int(k) for k in args.only_folds.split(",") if k] or list(range(args.folds))
    totals: dict[str, dict[str, list[float]]] = {}  # arm → part → held-out scores, in the order scored
    for k in wanted:
        held_out = [p for p in patients if p[0] in folds[k]]
        train_items = [i for name, v in items.items() if name not in folds[k] for i in v]
        fold_started = time.perf_counter()
        model, report = fold_model(base, train_items, folds[k], args, k)
        tuned = tuned_segmenter(model, args, held_out)
        propagate_too = not args.no_propagation
        results = {
            "off-the-shelf": evaluate(base_segmenter, held_out, args.seed + 100 + k, propagate_too=propagate_too),
            "fine-tuned": evaluate(tuned, held_out, args.seed + 100 + k, tuned_propagation, propagate_too),
        }
        if args.views:  # the same prompts (seed), each slice also decoded on its views; shares the cache
            for label, segmenter in (("off-the-shelf", base_segmenter), ("fine-tuned", tuned)):
                with_views = copy.copy(segmenter)
                with_views.views = args.views
                results[f"{label} + views"] = evaluate(with_views, held_out, args.seed + 100 + k, propagate_too=False)
        if args.average_models:
            members = []
            for segmenter in (base_segmenter, tuned):
                members.append(copy.copy(segmenter))
                members[-1].views = args.views
            label = "averaged models" + (" + views" if args.views else "")
            results[label] = evaluate(AveragedSegmenters(members), held_out, args.seed + 100 + k, propagate_too=False)
        if args.ensemble:
            ensemble = SliceSegmenter(model=DecoderEnsemble([base, model]), cache=args.cache)
            results["ensemble"] = evaluate(ensemble, held_out, args.seed + 100 + k)
        if args.bag > 1:  # more decoders on the same patients, other seeds (prompt draws and order)
            members = [model] + [train(base, train_items, args, args.seed + k + 1000 * m, f"fold {k} bag {m}")[0]
                                 for m in range(1, args.bag)]
            bagged = SliceSegmenter(model=DecoderEnsemble(members), cache=args.cache)
            results["bagged"] = evaluate(bagged, held_out, args.seed + 100 + k, tuned_propagation)
        line = []
        for label, scores in results.items():
            for part, values in scores.items():
                totals.setdefault(label, {}).setdefault(part, []).extend(values)
            line.append(f"{label}: " + " ".join(f"({part}) {np.mean(scores[part]):.3f}"
                                                for part in ("a", "b", "d", "d0") if part in scores))
        trained = f"{report.samples} prompts, {report.steps} steps" if report else f"loaded from {args.load_models}"
        print(f"fold {k} ({', '.join(folds[k])}; {trained}, "
              f"{time.perf_counter() - fold_started:.0f} s): " + "; ".join(line), flush=True)

    titles = {"a": "(a) box + 5 px, slice Dice", "b": "(b) loose box, slice Dice",
              "d": "(d) propagate from largest slice, volume Dice",
              "d0": "(d0) the same without the likeness stop",
              "d_box": "(d_box) propagate with boxes only (no mask prompt)"}
    print("\nheld-out figures over folds " + ",".join(map(str, wanted)))
    for part, title in titles.items():
        cells = []
        for label, scores in totals.items():
            values = np.asarray(scores.get(part, []))
            if values.size == 0:
                continue
            cells.append(f"{label} {values.mean():.4f} (median {np.median(values):.4f}, n={values.size})")
        if cells:
            print(f"  {title}: " + "  |  ".join(cells))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        summary = {label: {part: float(np.mean(v)) for part, v in scores.items()} for label, scores in totals.items()}
        args.json.write_text(json.dumps({"folds": wanted, "epochs": args.epochs, "summary": summary,
                                         "per_item": totals}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
