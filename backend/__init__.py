"""The Label Studio ML backend: thin, and never imports torch or ``workers``.

It speaks the label-studio-ml protocol (``/health``, ``/setup``, ``/predict``, ``/webhook``), turns
percent coordinates into pixels, enqueues jobs by name on Redis (RQ), waits for interactive results
with a deadline and formats brush results.

- ``backend.app``: the Flask app factory and ``sts-backend``.
- ``backend.model``: ``SegmentationBackend``, what each call does, without HTTP.
- ``backend.prompts``: task data and prompts (percent → pixels); ``backend.queueing``: enqueue and wait;
  ``core.redis_store``: the Redis keys shared with the workers; ``backend.settings``; ``backend.errors``.
"""
