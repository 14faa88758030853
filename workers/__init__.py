"""Everything that runs or trains a model, behind RQ queues.

- ``workers.jobs``: the job functions the backend enqueues by name (``core.queues``): interactive
  segmentation, propagation of an annotation to neighbouring slices, whole-case pre-annotation.
- ``workers.worker``: ``sts-worker``, an ``rq.SimpleWorker`` that keeps the models loaded, and its
  ``--status`` view.
- ``workers.segmentation``: the segmentation API (LiteMedSAM prompts, propagation, automatic model);
  ``workers.models``: model building and loading.

Importing ``workers`` or ``workers.jobs`` does not import torch; the model modules do, when a job runs.
"""
