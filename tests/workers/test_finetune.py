"""Tests of ``workers.finetune`` and of loading fine-tuned weights: real LiteMedSAM on CPU, no mocking."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.finetune import (
    SliceItem,
    augment_batch,
    batch_boxes,
    batch_mask_prompts,
    decode_batch,
    make_samples,
    neck_inputs,
    save_finetuned,
    segmentation_loss,
    train_litemedsam,
)
from workers.models.litemedsam import (
    DECODER_ENV,
    DecoderEnsemble,
    ModelFrame,
    WeightsError,
    load_litemedsam,
    mask_prompt_logits,
)
from workers.segmentation import SliceSegmenter, shrunk_boxes


def disk(height: int, width: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def base():
    return load_litemedsam("cpu")


@pytest.fixture(scope="module")
def embedded_slices(base):
    """Two phantom slices (a bright disk on noise) with their embeddings and masks."""
    segmenter = SliceSegmenter(model=base)
    out = []
    for seed, (cx, cy, r) in enumerate([(60, 70, 22), (90, 50, 15)]):
        rng = np.random.default_rng(seed)
        mask = disk(128, 140, (cx, cy), r)
        image = (rng.normal(200, 30, mask.shape) + 400 * mask).astype(np.float32)
        out.append((segmenter.embed(image), mask, segmenter.prepare(image)[1]))
    return out


def test_batched_decoding_equals_one_slice_at_a_time(base, embedded_slices):
    embeddings = torch.cat([e.embedding.float() for e, _, _ in embedded_slices])
    boxes = torch.tensor([[40.0, 50, 150, 160], [60, 20, 200, 130]])
    with torch.no_grad():
        logits, iou = decode_batch(base, embeddings, boxes)
        for i in range(2):
            single, single_iou = base.decode(embeddings[i : i + 1], boxes=boxes[i : i + 1])
            assert torch.allclose(logits[i], single[0], atol=1e-4)
            assert torch.allclose(iou[i], single_iou[0], atol=1e-5)


def test_a_batch_mixes_prompts_with_and_without_a_mask(base, embedded_slices):
    """Neighbour samples carry the neighbour's outline as SAM's dense prompt; the others do not, in one batch."""
    (first, mask, _), (second, _, _) = embedded_slices
    items = [SliceItem(first.key, first.frame, mask, above=mask)]
    samples = make_samples(items, np.random.default_rng(0), kinds=("tight", "neighbour"), mask_prompts=True)
    assert sorted(s.kind for s in samples) == ["neighbour", "tight"]
    neighbour = next(s for s in samples if s.kind == "neighbour")
    tight = next(s for s in samples if s.kind == "tight")
    assert tight.mask_prompt is None and neighbour.mask_prompt.shape == (256, 256)
    # jittered by at most 2 px: the prompt still overlaps the outline it came from almost entirely
    overlap = (neighbour.mask_prompt >= 0.5) & neighbour.target
    assert overlap.sum() > 0.8 * min(neighbour.target.sum(), (neighbour.mask_prompt >= 0.5).sum())
    batch = [tight, neighbour]
    embeddings = torch.cat([first.embedding.float(), second.embedding.float()])
    boxes = torch.from_numpy(np.stack([s.box for s in batch]))
    prompts = batch_mask_prompts(batch, torch.device("cpu"))
    assert prompts is not None and prompts[1].tolist() == [False, True]
    assert batch_mask_prompts([tight], torch.device("cpu")) is None
    with torch.no_grad():
        logits, _ = decode_batch(base, embeddings, boxes, prompts)
        plain, _ = base.decode(embeddings[:1], boxes=boxes[:1])
        assert torch.allclose(logits[0], plain[0], atol=1e-4)
        prompted, _ = base.decode(embeddings[1:], boxes=boxes[1:], mask_logits=prompts[0][1:])
        assert torch.allclose(logits[1], prompted[0], atol=1e-4)
        unprompted, _ = base.decode(embeddings[1:], boxes=boxes[1:])
        assert not torch.allclose(logits[1], unprompted[0], atol=1e-2)


def test_shrunk_box_samples_are_trained_on_the_logits_inference_averages(base, embedded_slices):
    """``make_samples(box_shrinks=...)`` gives tight/loose samples the boxes ``SliceSegmenter.segment``
    decodes, and ``decode_batch`` averages them as it does; neighbour samples keep one box."""
    (first, mask, _), (second, _, _) = embedded_slices
    items = [SliceItem(first.key, first.frame, mask, above=mask)]
    samples = make_samples(items, np.random.default_rng(0), kinds=("tight", "neighbour"), box_shrinks=(2.0, 4.0))
    tight = next(s for s in samples if s.kind == "tight")
    neighbour = next(s for s in samples if s.kind == "neighbour")
    assert neighbour.shrunk is None and tight.shrunk.shape == (2, 4)
    slice_box = first.frame.to_image(tight.box)
    expected = first.frame.to_model(shrunk_boxes(slice_box, (2.0, 4.0)))
    np.testing.assert_allclose(np.concatenate([tight.box[None], tight.shrunk]), expected, atol=1e-3)
    boxes, counts = batch_boxes([tight, neighbour])
    assert boxes.shape == (2, 3, 4) and counts.tolist() == [3, 1] and (boxes[1] == neighbour.box).all()
    assert batch_boxes([neighbour])[0].shape == (1, 1, 4)
    embeddings = torch.cat([first.embedding.float(), second.embedding.float()])
    with torch.no_grad():
        logits, _ = decode_batch(base, embeddings, torch.from_numpy(boxes), counts=counts)
        each, _ = base.decode(embeddings[:1], boxes=torch.from_numpy(boxes[0]))
        assert torch.allclose(logits[0, 0], each[:, 0].mean(dim=0), atol=1e-4)
        single, _ = base.decode(embeddings[1:], boxes=torch.from_numpy(boxes[1, :1]))
        assert torch.allclose(logits[1], single[0], atol=1e-4)
        segmenter = SliceSegmenter(model=base, box_shrinks=(2.0, 4.0))
        inferred, _ = segmenter.decode(first, boxes=shrunk_boxes(slice_box, segmenter.box_shrinks))
        assert np.abs(first.frame.logits_to_image(logits[:1])[0, 0].numpy() - inferred[:, 0].mean(0)).max() < 1e-3


def test_samples_teach_the_end_of_the_tumour():
    frame = ModelFrame.for_shape(100, 120)
    tumour = disk(100, 120, (60, 50), 20)
    empty = np.zeros_like(tumour)
    items = [SliceItem("a", frame, tumour, above=empty, below=tumour), SliceItem("b", frame, empty, below=tumour)]
    samples = make_samples(items, np.random.default_rng(0))
    kinds = sorted((s.slice_key, s.kind) for s in samples)
    assert kinds == [("a", "loose"), ("a", "neighbour"), ("a", "tight"), ("b", "neighbour")]
    past_end = next(s for s in samples if s.slice_key == "b")
    assert not past_end.target.any() and past_end.valid.sum() == frame.resized_height * frame.resized_width
    tight = next(s for s in samples if s.kind == "tight")
    ys, xs = np.nonzero(tight.target)
    x0, y0, x1, y1 = tight.box
    assert x0 < xs.min() and y0 < ys.min() and x1 > xs.max() and y1 > ys.max()


def test_empty_target_is_learnt_without_dividing_by_zero():
    logits = torch.full((1, 1, 8, 8), -5.0, requires_grad=True)
    loss, iou = segmentation_loss(logits, torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    assert torch.isfinite(loss) and float(iou) == 1.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_training_lowers_the_loss_and_leaves_the_resident_model_alone(base, embedded_slices):
    before = {k: v.clone() for k, v in base.mask_decoder.state_dict().items()}
    items = [SliceItem(e.key, e.frame, mask) for e, mask, _ in embedded_slices]
    samples = make_samples(items, np.random.default_rng(1), kinds=("tight",))
    embeddings = {e.key: e.embedding for e, _, _ in embedded_slices}
    model = copy.deepcopy(base)
    report = train_litemedsam(model, samples * 2, embeddings, epochs=4, batch_size=4, lr=3e-4)
    assert report.steps == 4 and len(report.losses) == 4
    assert report.losses[-1] < report.losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.mask_decoder.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


def test_a_saved_decoder_loads_over_the_base_weights(base, tmp_path: Path, monkeypatch):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    path = save_finetuned(model, tmp_path / "decoder.pt", {"note": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.pt"]
    tuned = load_litemedsam("cpu", finetuned_path=path)
    assert tuned is not base and tuned.version.startswith(f"{base.version}-ft-")
    assert tuned.encoder_version == base.encoder_version == base.version
    assert torch.equal(tuned.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    assert not torch.equal(base.mask_decoder.iou_token.weight, tuned.mask_decoder.iou_token.weight)
    assert load_litemedsam("cpu", finetuned_path=path) is tuned
    monkeypatch.setenv(DECODER_ENV, str(path))
    assert load_litemedsam("cpu") is tuned


@pytest.mark.parametrize("problem", ["truncated", "other base", "missing"])
def test_a_bad_decoder_checkpoint_is_refused_by_name(base, tmp_path: Path, problem: str):
    path = tmp_path / f"{problem.replace(' ', '-')}.pt"
    if problem == "truncated":
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    elif problem == "other base":
        torch.save({"base_sha256": "f" * 64, "state": {}, "metadata": {}}, path)
    with pytest.raises(WeightsError, match=str(path).replace(".", r"\.")):
        load_litemedsam("cpu", finetuned_path=path)


def test_flips_keep_the_box_around_the_target():
    frame = ModelFrame.for_shape(100, 160)  # image part 256 × 160: padding at the bottom
    target = torch.from_numpy(frame.mask_to_model(disk(100, 160, (30, 50), 12)) >= 0.5).float()[None, None]
    valid = torch.from_numpy(frame.mask_to_model(np.ones((100, 160))) >= 0.5).float()[None, None]
    images = torch.rand(1, 256, 256) * valid[0]
    box = torch.from_numpy(frame.to_model(np.array([[15.0, 35, 45, 65]])))
    prompts = (mask_prompt_logits(target), torch.tensor([True]))
    flipped_any = False
    for seed in range(6):
        out_images, out_boxes, out_target, out_prompts = augment_batch(
            images, box, target, valid, np.random.default_rng(seed), prompts
        )
        ys, xs = np.nonzero(out_target[0, 0].numpy())
        x0, y0, x1, y1 = out_boxes[0].tolist()
        assert x0 <= xs.min() and x1 >= xs.max() and y0 <= ys.min() and y1 >= ys.max()
        assert torch.equal(out_prompts[0] > 0, out_target > 0)  # the mask prompt flips with its image
        assert float(out_images[:, valid[0, 0] == 0].abs().max()) == 0  # padding stays padding
        flipped_any |= bool(xs.mean() > 128)
    assert flipped_any


def test_encoder_fine_tuning_gets_its_own_embeddings(base, embedded_slices, tmp_path: Path):
    items = [SliceItem(e.key, e.frame, mask) for e, mask, _ in embedded_slices]
    inputs = {e.key: torch.from_numpy(model_input) for e, _, model_input in embedded_slices}
    model = copy.deepcopy(base)
    report = train_litemedsam(
        model, lambda rng: make_samples(items, rng, kinds=("loose",)), inputs,
        train_encoder=True, epochs=1, batch_size=2, lr=1e-4,
    )
    assert report.steps == 1 and np.isfinite(report.losses).all()
    changed = [n for n, v in model.image_encoder.state_dict().items()
               if not torch.equal(v, base.image_encoder.state_dict()[n])]
    assert changed and not model.image_encoder.training
    path = save_finetuned(model, tmp_path / "full.pt", include_encoder=True)
    tuned = load_litemedsam("cpu", finetuned_path=path)
    assert tuned.encoder_version != base.encoder_version and tuned.encoder_version.startswith(base.encoder_version)
    image = embedded_slices[0][2]
    assert SliceSegmenter(model=tuned).prepare(image)[3] != SliceSegmenter(model=base).prepare(image)[3]


def test_neck_fine_tuning_trains_from_cached_neck_inputs_what_a_worker_then_embeds(base, embedded_slices, tmp_path):
    images = torch.stack([torch.from_numpy(m) for _, _, m in embedded_slices])[:, None].expand(-1, 3, -1, -1)
    features, embeddings = neck_inputs(base, images)
    assert features.shape == (2, 320, 64, 64)
    with torch.no_grad():  # the cached inputs, through the neck, are the frozen encoder's embeddings
        assert torch.allclose(base.image_encoder.neck(features), embeddings, atol=1e-4)
    for (embedded, _, _), embedding in zip(embedded_slices, embeddings, strict=True):
        assert torch.allclose(embedded.embedding.float()[0], embedding, atol=2e-2)  # float16 in the cache

    items = [SliceItem(e.key, e.frame, mask) for e, mask, _ in embedded_slices]
    inputs = {e.key: f.half() for (e, _, _), f in zip(embedded_slices, features, strict=True)}
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="one of train_encoder and train_neck"):
        train_litemedsam(model, [], inputs, train_encoder=True, train_neck=True)
    report = train_litemedsam(model, lambda rng: make_samples(items, rng, kinds=("loose",)), inputs,
                              train_neck=True, epochs=1, batch_size=2, lr=1e-3)
    assert report.steps == 1 and np.isfinite(report.losses).all()
    changed = {n.split(".")[0] for n, v in model.image_encoder.state_dict().items()
               if not torch.equal(v, base.image_encoder.state_dict()[n])}
    assert changed == {"neck"} and not model.image_encoder.training

    path = save_finetuned(model, tmp_path / "neck.pt", include_neck=True)
    saved = torch.load(path, weights_only=True)["state"]
    assert any(n.startswith("image_encoder.neck.") for n in saved)
    assert not any(n.startswith("image_encoder.") and not n.startswith("image_encoder.neck.") for n in saved)
    tuned = load_litemedsam("cpu", finetuned_path=path)
    assert tuned.encoder_version != base.encoder_version  # so no base embedding is served with the new neck
    with torch.no_grad():  # a worker's full encoder pass gives what training's neck gave
        assert torch.allclose(tuned.embed(images), model.image_encoder.neck(features), atol=1e-3)


def test_a_decoder_ensemble_averages_its_members_over_one_embedding(base, embedded_slices):
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias.add_(0.5)
    tuned.version = f"{base.version}-ft-test"
    ensemble = DecoderEnsemble([base, tuned])
    assert ensemble.encoder_version == base.encoder_version and ensemble.version == f"{base.version}+{tuned.version}"
    embedded, mask, _ = embedded_slices[0]
    box = torch.tensor([[40.0, 50, 150, 160]])
    with torch.no_grad():
        mean, mean_iou = ensemble.decode(embedded.embedding, boxes=box)
        (a, a_iou), (b, b_iou) = base.decode(embedded.embedding, boxes=box), tuned.decode(embedded.embedding, boxes=box)
        assert not torch.allclose(a, b)
        assert torch.allclose(mean, (a + b) / 2, atol=1e-5) and torch.allclose(mean_iou, (a_iou + b_iou) / 2)
        many, _ = ensemble.decode_many(embedded.embedding, box)
        assert torch.allclose(many, mean, atol=1e-4)

    # The members share the base encoder, so the base's cached embedding serves the ensemble as is.
    base_segmenter = SliceSegmenter(model=base)
    image = (np.random.default_rng(5).normal(200, 30, mask.shape) + 400 * mask).astype(np.float32)
    base_segmenter.embed(image)
    segmenter = SliceSegmenter(model=ensemble, cache=base_segmenter.cache)
    segmenter.segment(image, box=(30, 40, 95, 100))
    assert segmenter.encoder_calls == 0


def test_a_decoder_ensemble_refuses_members_with_different_encoders(base):
    other = copy.deepcopy(base)
    other.encoder_version = f"{base.encoder_version}-ft-encoder"
    with pytest.raises(ValueError, match="share one image encoder"):
        DecoderEnsemble([base, other])
