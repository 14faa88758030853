"""Importers: read a patient's MRI series, put them on one grid, hand slices to Label Studio.

Knows DICOM and NIfTI; knows nothing about models. Entry point: ``importers.pipeline.import_patient``
(the ``import-patient`` CLI is a thin shell around it).
"""
