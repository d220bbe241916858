"""The data layer's errors: each message says what failed, for which dataset or file, and what to do."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of the data layer's errors; messages say what failed and what to do."""


class DownloadError(DataError):
    """A download failed (HTTP error, too many transient failures, Google Drive refusal)."""


class ChecksumError(DownloadError):
    """A file's md5/sha256 differs from the published one."""


class ManualDownloadRequired(DataError):
    """A file cannot be fetched automatically (licence, dead link) and was not found locally."""


class ExtractionError(DataError):
    """An archive is unreadable or holds a member that would land outside the target folder."""


class LayoutError(DataError):
    """Extracted data lack expected paths or images."""
