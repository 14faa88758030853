"""Wall time and peak memory of importing a patient (default: TCIA STS_001) into Label Studio.

Starts a throw-away Label Studio (as the tests do), runs ``import-patient --json`` in a child
process ``--repeat`` times (the first run creates tasks, later runs find them unchanged) and prints
the stage timings (read / register / resample / write / png / label_studio) and the child's peak RSS.

    .venv/bin/python benchmarks/bench_import.py [--patient DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import LabelStudioServer  # noqa: E402

STAGES = ("read", "register", "resample", "write", "png", "label_studio", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patient", type=Path, default=REPO.parent / "shared/data/tcia-sts-raw/STS_001")
    parser.add_argument("--patient-id", default="STS-0001")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = LabelStudioServer(document_root=Path(tmp) / "root", data_dir=Path(tmp) / "ls")
        server.start()
        try:
            env = {**os.environ, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": server.token,
                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(server.document_root),
                   "STS_DATA_DIR": str(server.document_root / "data"), "STS_LS_PROJECT": "benchmark"}
            runs = []
            for i in range(args.repeat):
                started = time.perf_counter()
                done = subprocess.run([str(REPO / ".venv/bin/import-patient"), str(args.patient), "--patient-id",
                                       args.patient_id, "--tissue", "Myxoid", "--json"],
                                      env=env, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - started
                if done.returncode:
                    sys.exit(f"import failed:\n{done.stderr}")
                result = json.loads(done.stdout)
                runs.append((wall, result))
                print(f"run {i + 1}: wall {wall:.2f} s (process start included), tasks created "
                      f"{result['tasks_created']}, updated {result['tasks_updated']}, "
                      f"unchanged {result['tasks_unchanged']}")
        finally:
            server.stop()

    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\n{args.patient.name}: reference {runs[0][1]['reference_modality']} {runs[0][1]['shape']}, "
          f"slices {runs[0][1]['slices']}, {os.cpu_count()} CPUs")
    print(f"{'stage':<14}{'first run s':>12}{'median later s':>16}")
    for stage in STAGES:
        first = runs[0][1]["timings_s"].get(stage, 0.0)
        later = [r["timings_s"].get(stage, 0.0) for _, r in runs[1:]]
        print(f"{stage:<14}{first:>12.2f}{(statistics.median(later) if later else float('nan')):>16.2f}")
    print(f"{'wall (CLI)':<14}{runs[0][0]:>12.2f}{statistics.median([w for w, _ in runs[1:]] or [0]):>16.2f}")
    print(f"peak RSS of the import process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
