"""Exceptions raised by nvila.

Every error a user can cause (bad media, a broken checkpoint folder, a prompt that does not fit) is an
`NvilaError` subclass with a message that names the problem and how to fix it. The CLI prints these
messages without a traceback; anything else escaping is a bug.
"""

from __future__ import annotations


class NvilaError(Exception):
    """Base class of every error nvila raises on purpose."""


class MediaError(NvilaError, ValueError):
    """An image or video could not be read or is not acceptable (missing, corrupt, too large, ...)."""


class CheckpointError(NvilaError):
    """A checkpoint folder is missing parts, has unexpected tensors/shapes, or cannot be fetched."""


class ConfigError(NvilaError, ValueError):
    """A configuration value is missing or invalid."""


class PromptError(NvilaError, ValueError):
    """The prompt is malformed or does not fit into the model (too long, wrong media count, ...)."""
