"""Exceptions raised by this project.

Every error a user can cause derives from ``ProjectError``; the CLIs catch only that,
print ``TypeName: message`` and exit non-zero. Messages name the file (or object) and
the problem, and chain the cause with ``from exc``.

::

    ProjectError
    ├── InputError                 bad input files
    │   ├── SeriesError            DICOM/NIfTI series: unreadable, missing/duplicate slices, wrong SOP class
    │   ├── GeometryError          spacing, orientation, grids that do not match
    │   └── ContourError           RTSTRUCT / mask that cannot be placed on a series
    ├── ConfigError                a missing or malformed setting (names the variable)
    ├── RegistrationError          registration failed outright (not merely "looks bad")
    ├── LabelStudioError           the Label Studio server refused or could not be reached
    └── AnnotationError            annotations that cannot be decoded
        └── BrushDecodeError       a brush RLE that does not decode to the declared size
"""

from __future__ import annotations


class ProjectError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(ProjectError):
    """An input file or folder cannot be used."""


class SeriesError(InputError):
    """A DICOM or NIfTI series is unreadable or incomplete."""


class GeometryError(InputError):
    """Geometry is inconsistent: spacing, orientation or grids that should match do not."""


class ContourError(InputError):
    """An existing contour (RTSTRUCT ROI, mask) cannot be placed on its series."""


class ConfigError(ProjectError):
    """A setting is missing or malformed."""


class RegistrationError(ProjectError):
    """Registration could not produce a transform."""


class LabelStudioError(ProjectError):
    """Label Studio refused a request or could not be reached."""


class AnnotationError(ProjectError):
    """An annotation cannot be interpreted."""


class BrushDecodeError(AnnotationError):
    """A brush RLE does not decode to the size its result declares."""
