"""Exporters: reviewed slice annotations back to NIfTI volumes, measurements and training sets."""
