"""Interactive latency, click → mask, through HTTP + Redis + an ``sts-worker`` process (CPU unless CUDA).

Starts a private Redis, imports the phantom patient into a temporary case store (or uses
``--data-dir``/``--case``), starts ``python -m workers.worker`` (model warmed) and the backend on a
loopback port, then sends interactive ``/predict`` requests as Label Studio does (a smart rectangle
in percent around the tumour):

* first call on a slice: the image encoder runs (embedding not cached yet);
* repeated calls on the same slice (the box moved by a pixel each time): embedding cache warm;
* first call on a slice of a case the workers warmed beforehand: "retrieve predictions" (a
  ``/predict`` without a prompt) enqueues ``preannotate_case``, which, with no automatic model,
  embeds the case's slices ahead of the annotator (``workers.jobs.warm_embeddings``). This is what
  an annotator meets when a case was opened a minute before its first click. A CPU worker averages
  in its warm views there (``$STS_WARM_PROMPT_VIEWS``); the line says which views the jobs used.

It prints p50/p95 for both, and the time of a "retrieve predictions" call with 1,000 tasks.

    .venv/bin/python benchmarks/bench_interactive.py [--slices 8] [--repeat 5]

On a machine without the importer's dependencies (the GPU device: no SimpleITK or pydicom), import
the phantom here and carry the case store: ``--prepare DIR`` writes it (with the true mask) and
exits, ``--prepared DIR`` benchmarks on it (``benchmarks/prepare_device.sh`` does this).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import RedisServer, find_free_port  # noqa: E402


def percentiles(values: list[float]) -> str:
    a = np.asarray(values) * 1000
    return f"p50 {np.percentile(a, 50):7.0f} ms   p95 {np.percentile(a, 95):7.0f} ms   (n={a.size})"


def box_payload(case: str, modality: str, z: int, n_slices: int, mask: np.ndarray, shift: int) -> dict:
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min() - 3 + shift, ys.min() - 3
    x1, y1 = xs.max() + 4 + shift, ys.max() + 4
    region = {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "box",
              "to_name": "image", "type": "rectanglelabels",
              "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                        "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": ["Tumor"]}}
    task = {"id": z + 1, "data": {"case_id": case, "modality": modality, "slice_index": z, "n_slices": n_slices}}
    return {"tasks": [task], "params": {"context": {"result": [region]}}}


def wait_for_idle(connection, queue_name: str, timeout_s: float = 900) -> None:
    """Until ``queue_name`` has no queued or running job (the warm-up and its continuations)."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    queue = Queue(queue_name, connection=connection)
    started = StartedJobRegistry(queue_name, connection=connection)
    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)
    while queue.count or started.count:
        if time.monotonic() > deadline:
            sys.exit(f"{queue_name} queue still busy after {timeout_s:.0f} s")
        time.sleep(0.5)


def prepare_case(folder: Path) -> Path:
    """Import the phantom patient as case ``BENCH`` into ``folder/data``; its true mask to ``truth.npz``."""
    from core.case_store import CaseStore
    from importers.phantom import write_phantom_patient
    from importers.pipeline import ImportOptions, import_patient

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        truth = write_phantom_patient(Path(tmp) / "patient", tissue="Myxoid", seed=3)
        import_patient(Path(tmp) / "patient", ImportOptions("BENCH"), CaseStore(folder / "data"), sync=None)
    np.savez_compressed(folder / "truth.npz", mask=truth.t1.array.astype(bool))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=8, help="distinct slices (first calls)")
    parser.add_argument("--repeat", type=int, default=5, help="repeated calls per slice")
    parser.add_argument("--modality", default="T2")
    parser.add_argument("--prepare", type=Path, help="only import the phantom case into DIR (and exit)")
    parser.add_argument("--prepared", type=Path, help="benchmark on a case DIR written by --prepare")
    args = parser.parse_args()
    if args.prepare:
        prepare_case(args.prepare)
        print(f"case store and true mask written to {args.prepare}")
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("backend").setLevel(logging.WARNING)

    from backend.app import create_app
    from backend.settings import BackendSettings
    from core.settings import Settings

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis_server:
        prepared = args.prepared or prepare_case(Path(tmp) / "case")
        data_dir = prepared / "data"
        mask = np.load(prepared / "truth.npz")["mask"]
        tumour_slices = [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]
        slices = tumour_slices[:: max(1, len(tumour_slices) // args.slices)][: args.slices]
        warmed_slices = [z for z in tumour_slices if z not in slices]

        env = {**os.environ, "REDIS_URL": redis_server.url, "STS_DATA_DIR": str(data_dir),
               "STS_EMBEDDING_CACHE": str(Path(tmp) / "embeddings")}
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115 - the child writes to it
        started = time.perf_counter()
        worker = subprocess.Popen([sys.executable, "-m", "workers.worker", "--no-scheduler"], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        from werkzeug.serving import make_server

        port = find_free_port()
        app = create_app(BackendSettings(core=Settings(redis_url=redis_server.url)))
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{port}/predict"
        try:
            import redis
            from rq import Worker

            connection = redis.Redis.from_url(redis_server.url)
            while not Worker.all(connection=connection):
                if worker.poll() is not None:
                    sys.exit(f"worker exited:\n{(Path(tmp) / 'worker.log').read_text()[-3000:]}")
                time.sleep(0.2)
            print(f"worker up and warm after {time.perf_counter() - started:.1f} s "
                  f"({Worker.all(connection=connection)[0].name})")

            first, repeated = [], []
            session = requests.Session()
            for z in slices:
                for k in range(args.repeat + 1):
                    payload = box_payload("BENCH", args.modality, z, mask.shape[0], mask[z], shift=k % 2)
                    t0 = time.perf_counter()
                    response = session.post(url, json=payload, timeout=120)
                    elapsed = time.perf_counter() - t0
                    if response.status_code != 200:
                        sys.exit(f"slice {z}: HTTP {response.status_code} {response.text}")
                    (first if k == 0 else repeated).append(elapsed)
            warm_started = time.perf_counter()
            bench_tasks = [{"id": 100 + z, "data": {"case_id": "BENCH", "modality": args.modality, "slice_index": z}}
                           for z in range(mask.shape[0])]
            response = session.post(url, json={"tasks": bench_tasks}, timeout=120)
            assert response.status_code == 200, response.text
            wait_for_idle(connection, "preannotate")
            warm_s = time.perf_counter() - warm_started
            warmed = []
            for z in warmed_slices:
                payload = box_payload("BENCH", args.modality, z, mask.shape[0], mask[z], shift=0)
                t0 = time.perf_counter()
                response = session.post(url, json=payload, timeout=120)
                warmed.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text

            tasks = [{"id": i, "data": {"case_id": f"C{i // 40:03d}", "modality": "T2", "slice_index": i % 40}}
                     for i in range(1000)]
            retrieve = []
            for _ in range(5):
                t0 = time.perf_counter()
                response = session.post(url, json={"tasks": tasks}, timeout=120)
                retrieve.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text

            from rq.job import Job
            from rq.registry import FinishedJobRegistry

            ids = FinishedJobRegistry("interactive", connection=connection).get_job_ids()
            jobs = sorted(Job.fetch_many(ids, connection=connection), key=lambda j: j.enqueued_at)
            warmed_views = sorted({",".join(j.return_value().get("views") or ["none"])
                                   for j in jobs[len(slices) * (args.repeat + 1):]})
            jobs = jobs[: len(slices) * (args.repeat + 1)]  # the cold/repeated phase
            worker_s = [j.return_value()["elapsed_ms"] / 1000 for j in jobs]
            first_worker = [w for i, w in enumerate(worker_s) if i % (args.repeat + 1) == 0]
            repeated_worker = [w for i, w in enumerate(worker_s) if i % (args.repeat + 1) != 0]
            device = connection.hget(f"sts:worker:{Worker.all(connection=connection)[0].name}", "device")
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings on a shared CPU vary)")
            print(f"device {device.decode() if device else '?'}, slice {mask.shape[2]}×{mask.shape[1]} px, "
                  f"{len(slices)} slices × (1 + {args.repeat}) calls, HTTP → backend → Redis → worker → back")
            print(f"first call on a slice (encoder runs):   {percentiles(first)}")
            print(f"repeated call, same slice (cache warm): {percentiles(repeated)}")
            print(f"  of which in the job (read PNG, model, RLE): first {percentiles(first_worker)}")
            print(f"                                           repeated {percentiles(repeated_worker)}")
            print(f"first call on a warmed case's slice:    {percentiles(warmed)}  "
                  f"(the case's {mask.shape[0]} slices warmed in {warm_s:.0f} s; views averaged in: "
                  f"{' / '.join(warmed_views)})")
            print(f"retrieve predictions, 1000 tasks:       {percentiles(retrieve)}  (25 cases enqueued once)")
        finally:
            server.shutdown()
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            log.close()


if __name__ == "__main__":
    main()
