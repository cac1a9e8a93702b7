"""Errors of the whole-slide pipeline, and the one-line form of a library's error they quote.

Every error names the slide or file; a slide library's own message (which may span lines or quote whole
TIFF headers) is shortened to one line first.
"""

from __future__ import annotations

__all__ = [
    "WSIError",
    "SlideReadError",
    "NoTissueError",
    "MissingMPPError",
    "FeatureMismatchError",
    "FeatureFileError",
    "one_line",
]


class WSIError(RuntimeError):
    """Base error of the whole-slide pipeline; the message names the slide or file."""


class SlideReadError(WSIError):
    """The slide cannot be opened or read (unsupported, unreadable, truncated)."""


class NoTissueError(WSIError):
    """Tissue detection found nothing on the slide."""


class MissingMPPError(WSIError):
    """A target mpp/magnification was asked for but the slide has no such metadata."""


class FeatureMismatchError(WSIError):
    """A feature file does not match what the consumer expects (feature dim, backbone, weights, settings)."""


class FeatureFileError(FeatureMismatchError):
    """A feature file is damaged, truncated, incomplete, empty or lacks a dataset; the message names it."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err`` as one short line: libraries' messages may span lines or quote whole headers."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
