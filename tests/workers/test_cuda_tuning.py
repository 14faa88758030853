"""CUDA graphs and cuDNN switches (``workers.models.cuda_tuning``): what can be checked without a GPU.

The capture itself needs CUDA (``benchmarks/device_suite.sh levers`` measures it); here: the buckets
and padding a graph relies on, that LiteMedSAM's batched encoder and decoder give every real item
the same answer with zero padding beside it (what a replayed graph computes), and that a CPU call is
always the eager one, whatever the switch says.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from workers.models.cuda_tuning import (
    CUDA_GRAPHS_ENV,
    CUDNN_BENCHMARK_ENV,
    BatchGraphs,
    bucket_size,
    configure_cudnn,
    cuda_graphs_enabled,
    graphs_of,
    pad_to,
)
from workers.models.litemedsam import load_litemedsam


@pytest.fixture(scope="module")
def model():
    return load_litemedsam("cpu")


def test_buckets_are_the_next_power_of_two_up_to_the_largest() -> None:
    assert [bucket_size(n) for n in (1, 2, 3, 5, 33, 64, 65, 200, 256)] == [1, 2, 4, 8, 64, 64, 128, 256, 256]
    assert bucket_size(257) is None
    assert bucket_size(100, largest=64) is None
    with pytest.raises(ValueError, match="0 items"):
        bucket_size(0)


def test_padding_appends_zeros_and_keeps_the_items() -> None:
    items = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    flags = torch.tensor([True, False, True])
    padded_items, padded_flags = pad_to([items, flags], 4)
    assert padded_items.shape == (4, 2) and torch.equal(padded_items[:3], items)
    assert torch.equal(padded_items[3], torch.zeros(2))
    assert padded_flags.tolist() == [True, False, True, False]
    assert pad_to([items], 3)[0] is items
    with pytest.raises(ValueError, match="batch of 3 does not fit a bucket of 2"):
        pad_to([items], 2)


def test_the_encoder_answers_each_slice_alike_with_padding_beside_it(model) -> None:
    """A graph of batch 2 fed one slice and a zero slice must give that slice's own embedding."""
    image = torch.from_numpy(np.random.default_rng(3).random((1, 1, 256, 256), dtype=np.float32))
    with torch.inference_mode():
        alone = model.embed(image)
        padded = model.embed(pad_to([image], 2)[0])
    assert padded.shape == (2, 256, 64, 64)
    torch.testing.assert_close(padded[:1], alone, atol=1e-4, rtol=1e-4)


def test_the_box_decoder_answers_each_prompt_alike_with_padding_beside_it(model) -> None:
    """Zero embeddings and zero boxes in the padding change nothing of the real prompts' logits."""
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(3, 256, 64, 64, generator=generator)
    boxes = torch.tensor([[40.0, 50, 120, 140], [60, 60, 200, 180], [10, 20, 90, 100]])
    with torch.inference_mode():
        logits, iou = model.decode_many(embeddings, boxes)
        padded_logits, padded_iou = model.decode_many(*pad_to([embeddings, boxes], 4))
    assert padded_logits.shape == (4, 1, 256, 256)
    torch.testing.assert_close(padded_logits[:3], logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded_iou[:3], iou, atol=1e-5, rtol=1e-5)


def test_a_cpu_call_is_the_eager_one_even_with_graphs_switched_on(monkeypatch) -> None:
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "on")
    assert cuda_graphs_enabled()
    calls = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return 2 * x

    graphs = BatchGraphs("double")
    with torch.inference_mode():
        out = graphs(double, torch.ones(3, 2))
    assert torch.equal(out, torch.full((3, 2), 2.0))
    assert calls == [3] and not graphs.captured and not graphs.failed


def test_the_switches_are_off_by_default_and_refuse_other_words(monkeypatch) -> None:
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert not cuda_graphs_enabled()
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "maybe")
    with pytest.raises(ConfigError, match=CUDA_GRAPHS_ENV):
        cuda_graphs_enabled()
    monkeypatch.setenv(CUDNN_BENCHMARK_ENV, "on")
    before = torch.backends.cudnn.benchmark
    configure_cudnn(torch.device("cpu"))  # a CPU model leaves cuDNN alone
    assert torch.backends.cudnn.benchmark == before
    monkeypatch.setenv(CUDNN_BENCHMARK_ENV, "sometimes")
    with pytest.raises(ConfigError, match=CUDNN_BENCHMARK_ENV):
        configure_cudnn(torch.device("cuda"))


def test_a_models_graphs_share_one_pool_and_go_with_the_model() -> None:
    net = torch.nn.Linear(2, 2)
    encoder, decoder = graphs_of(net, "embed"), graphs_of(net, "decode_many")
    assert graphs_of(net, "embed") is encoder
    assert encoder is not decoder and encoder.pool is decoder.pool
    assert encoder.name == "Linear.embed"
    other = graphs_of(torch.nn.Linear(2, 2), "embed")
    assert other.pool is not encoder.pool
    from workers.models import cuda_tuning

    count = len(cuda_tuning._GRAPHS)
    del net, encoder, decoder
    gc.collect()
    assert len(cuda_tuning._GRAPHS) == count - 1
