"""Two switches for batched LiteMedSAM on a GPU: CUDA graphs and cuDNN's autotuner.

Whole-case pre-annotation (``SliceSegmenter.segment_many``) measured 164-179 slices/s on an H200
against the issue's 300, while the image encoder alone ran 440-486 slices/s on a batch already on
the GPU. TinyViT and SAM's decoder are hundreds of small kernels a batch, each launched by the
calling thread in Python; the helper threads that prepare the next batch and encode the last one's
brush RLE hold the GIL meanwhile, so launches can wait on them and the GPU on the launches.

- ``$STS_CUDA_GRAPHS`` (off by default): the encoder and the box decoder are each captured once per
  batch size bucket (powers of two up to ``DEFAULT_LARGEST_BUCKET``) as a CUDA graph; a call then
  copies its batch into the graph's input, launches the whole graph at once and copies the output
  out. A batch is padded with zeros to its bucket: every slice and every prompt is computed on its
  own (TinyViT's batch norms are folded into its convolutions, attention never mixes a batch), so
  the padding changes nothing of the real items (``pad_to``; tested on CPU). If a capture fails,
  the model says so once and runs eagerly from then on.
- ``$STS_CUDNN_BENCHMARK`` (off by default): ``torch.backends.cudnn.benchmark``, cuDNN timing its
  convolution algorithms per input shape instead of picking one by heuristics (TinyViT's
  convolutions and the decoder's transposed ones); each new shape pays a one-off search.

Both are off until a GPU session measures them (``benchmarks/bench_preannotate.py --cuda-graphs
--cudnn-benchmark``; ``benchmarks/device_suite.sh levers``); neither is used on a CPU, where a call
is always the eager one.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from core.settings import env_flag

log = logging.getLogger(__name__)

CUDA_GRAPHS_ENV = "STS_CUDA_GRAPHS"
"""On/off: batched encoder and box decoder calls on CUDA replayed from captured CUDA graphs."""

CUDNN_BENCHMARK_ENV = "STS_CUDNN_BENCHMARK"
"""On/off: ``torch.backends.cudnn.benchmark`` for a model loaded on CUDA."""

DEFAULT_LARGEST_BUCKET = 256
"""Largest batch captured as a graph: a batch of 64 slices with the box and its three shrunk boxes is
256 prompts. Larger batches run eagerly."""

TensorFn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def cuda_graphs_enabled() -> bool:
    """``$STS_CUDA_GRAPHS`` (default off). Raises ``ConfigError`` on a word that is not on/off."""
    return env_flag(CUDA_GRAPHS_ENV, default=False)


def configure_cudnn(device: torch.device) -> None:
    """Apply ``$STS_CUDNN_BENCHMARK`` when a model is loaded on a CUDA ``device`` (process-wide)."""
    if device.type == "cuda" and env_flag(CUDNN_BENCHMARK_ENV, default=False):
        torch.backends.cudnn.benchmark = True
        log.info("cuDNN autotuner on ($%s)", CUDNN_BENCHMARK_ENV)


def bucket_size(count: int, largest: int = DEFAULT_LARGEST_BUCKET) -> int | None:
    """The batch size a batch of ``count`` is padded to: the next power of two, or None above ``largest``
    (few buckets, so few captures, and never more than twice the work of the batch itself)."""
    if count < 1:
        raise ValueError(f"a batch of {count} items has no bucket")
    size = 1 << (count - 1).bit_length()
    return size if size <= largest else None


def pad_to(tensors: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Each tensor zero-padded along its first (batch) dimension to ``size`` items."""
    padded = []
    for tensor in tensors:
        missing = size - tensor.shape[0]
        if missing < 0:
            raise ValueError(f"a batch of {tensor.shape[0]} does not fit a bucket of {size}")
        padded.append(tensor if missing == 0 else torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))]))
    return padded


def as_outputs(value: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


@dataclass
class _Pool:
    """One model's CUDA graph memory pool, made at its first capture."""

    handle: tuple | None = None


@dataclass
class BatchGraphs:
    """One function of batched tensors, replayed from one CUDA graph per batch bucket where it can be.

    A call uses a graph only on CUDA, in inference mode, with graphs switched on
    (``cuda_graphs_enabled``) and a batch that fits ``largest``; otherwise, or when a capture fails
    (once: the model then stays eager), it is ``fn`` itself. Graphs are told apart by bucket, the
    inputs' trailing shapes and dtypes and the autocast state, which a capture bakes in. All of a
    model's graphs share one memory pool: each replay's inputs are copied in just before it and its
    outputs copied out just after it, in stream order, so no graph's memory is live across calls.
    """

    name: str
    pool: _Pool = field(default_factory=_Pool)
    largest: int = DEFAULT_LARGEST_BUCKET
    failed: bool = False
    captured: dict[tuple, _Captured] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, fn: TensorFn, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``fn(*inputs)``, from a graph of it where one can be used. ``fn`` must be the same
        computation at every call (its graph is replayed with new inputs, never re-traced)."""
        count = inputs[0].shape[0]
        size = bucket_size(count, self.largest) if count else None
        if (size is None or self.failed or inputs[0].device.type != "cuda"
                or not torch.is_inference_mode_enabled() or not cuda_graphs_enabled()):
            return fn(*inputs)
        key = (size, *((tuple(t.shape[1:]), t.dtype) for t in inputs),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        with self.lock:
            captured = self.captured.get(key) or self._capture(fn, key, size, inputs)
            if captured is None:
                return fn(*inputs)
            for static, given in zip(captured.inputs, inputs, strict=True):
                static[:count].copy_(given, non_blocking=True)
                if count < size:
                    static[count:].zero_()
            captured.graph.replay()
            outputs = tuple(output[:count].clone() for output in captured.outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    def _capture(self, fn: TensorFn, key: tuple, size: int, inputs: Sequence[torch.Tensor]) -> _Captured | None:
        try:
            static = pad_to([t.detach() for t in inputs], size)
            static = [t.clone() for t in static]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuDNN/cuBLAS choices
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool.handle is None:
                self.pool.handle = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool.handle):
                outputs = as_outputs(fn(*static))
        except Exception as error:  # a kernel that cannot be captured: eager from now on, said once
            self.failed = True
            log.warning("CUDA graph of %s not captured (%s: %s); running it eagerly", self.name,
                        type(error).__name__, error)
            return None
        self.captured[key] = _Captured(graph, static, outputs)
        log.info("captured a CUDA graph of %s for batches up to %d", self.name, size)
        return self.captured[key]


_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, BatchGraphs]] = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def graphs_of(model: torch.nn.Module, name: str) -> BatchGraphs:
    """The model's ``BatchGraphs`` called ``name`` (made on first use; a model's graphs share a pool).

    Kept beside the model, weakly, rather than on it: copying a model (``copy.deepcopy`` when a
    fine-tuned decoder is applied over the base weights) never copies captured graphs, and a model
    dropped (cross-validation folds) takes its graphs with it.
    """
    with _GRAPHS_LOCK:
        own = _GRAPHS.setdefault(model, {})
        if name not in own:
            pool = next(iter(own.values())).pool if own else _Pool()
            own[name] = BatchGraphs(f"{type(model).__name__}.{name}", pool=pool)
        return own[name]
