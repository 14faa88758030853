"""The contract between the backend (which enqueues) and the workers (which run jobs).

The backend never imports torch or ``workers``: it enqueues jobs by dotted name. Names,
queues and time limits live here so both sides agree.
"""

from __future__ import annotations

INTERACTIVE_QUEUE = "interactive"
"""An annotator is waiting: small jobs, highest priority."""
PREANNOTATE_QUEUE = "preannotate"
"""Whole cases or many slices, batched on the GPU."""
TRAIN_QUEUE = "train"
"""Long jobs: retraining and evaluation."""
QUEUES_BY_PRIORITY = (INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, TRAIN_QUEUE)

SEGMENT_INTERACTIVE_JOB = "workers.jobs.segment_interactive"
PROPAGATE_ANNOTATION_JOB = "workers.jobs.propagate_annotation"
PREANNOTATE_CASE_JOB = "workers.jobs.preannotate_case"
WARM_EMBEDDINGS_JOB = "workers.jobs.warm_embeddings"

DEFAULT_INTERACTIVE_TIMEOUT_S = 30
"""Job time limit for one interactive segmentation (the backend waits far less)."""
DEFAULT_INTERACTIVE_WAIT_S = 20.0
"""How long the backend waits for an interactive result before answering with an error."""
DEFAULT_PREANNOTATE_TIMEOUT_S = 15 * 60
DEFAULT_TRAIN_TIMEOUT_S = 6 * 3600
DEFAULT_RESULT_TTL_S = 3600
"""Finished results stay in Redis this long (the backend reads them once)."""
DEFAULT_FAILURE_TTL_S = 7 * 24 * 3600
"""Failed jobs stay visible to an administrator for a week."""
