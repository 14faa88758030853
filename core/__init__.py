"""Code shared by importers, backend, workers and exporters.

Depends only on numpy and SimpleITK (and the standard library); imports none of the
other top-level packages. Modules:

- ``errors``: the exception tree every role raises.
- ``geometry``: ``Volume`` (array ``[z, y, x]`` + LPS geometry) and the one place where
  SimpleITK / NIfTI conventions are converted.
- ``case_store``: the on-disk layout of a case and atomic writes.
- ``labeling``: the Label Studio labeling config and task-data keys.
- ``brush_rle``: Label Studio's brush RLE, encode and decode.
- ``settings``: environment variables, read once in entry points.
"""
