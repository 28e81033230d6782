"""Errors imgclf raises on purpose. The CLI maps them to exit codes; nothing else needs to catch them.

Every message names the file or argument, what was expected and what was received, so that a user can fix
the input without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportCheckFailed",
    "ImageError",
    "ImgclfError",
    "TrainingDiverged",
    "TrainingInterrupted",
]


class ImgclfError(Exception):
    """A failure the user can act on (bad data, missing file, corrupt checkpoint). CLI exit code 1."""

    exit_code = 1


class DataError(ImgclfError):
    """The image folder or a manifest cannot be used as given."""


class ConfigError(ImgclfError):
    """An argument or configuration value is invalid. CLI exit code 2 (usage error)."""

    exit_code = 2


class ImageError(ImgclfError):
    """One image cannot be decoded or is outside the limits; names the file.

    `kind` says which: "not_image" (no format Pillow reads), "too_large" (above the pixel limit, found from the
    header before decoding), "corrupt" (an image format that fails to open or decode). The server maps them to
    HTTP 415, 413 and 422.
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


class CheckpointError(ImgclfError):
    """A checkpoint or model bundle is missing, corrupt or does not match the run."""


class ExportCheckFailed(ImgclfError):
    """An exported model computes something other than the trained one; the file was not kept."""


class TrainingDiverged(ImgclfError):
    """The loss or the weights stopped being finite numbers."""


class TrainingInterrupted(ImgclfError):
    """A signal stopped training after a finished batch; a checkpoint to resume from was written.
    CLI exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
