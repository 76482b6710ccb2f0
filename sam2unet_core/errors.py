"""Exceptions that say what went wrong as data, so that callers decide without reading text.

Each carries a ``kind`` (one of :data:`KINDS`), the ``field`` it is about (a keyword of the
library call, e.g. ``"slice_range"``; None when no option is concerned) and a ``value``:

* :class:`OptionError` (``option``): ``field`` was given the unusable ``value``.
* :class:`UnreadableInputError` (``unreadable_input``): an input file or folder cannot be
  read; the message names it and the cause.
* :class:`OutOfMemoryError` (``out_of_memory``): the work does not fit in the memory at hand;
  ``field``/``value``, when set, are the option and the value that need less (e.g.
  ``batch_size``, 4).
* :class:`UnsupportedModelError` (``unsupported_model``): a checkpoint that cannot be used.

The messages are the library's own words and name no command-line flag: a CLI maps
``field`` to its flags, a GUI chooses its advice by ``kind``. Each class is also the
built-in type the library raised for it before (``ValueError``; out of memory also
``MemoryError``), so ``except ValueError`` keeps catching them. Torch-free.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["KINDS", "OPTION", "OUT_OF_MEMORY", "UNREADABLE_INPUT", "UNSUPPORTED_MODEL", "OptionError",
           "OutOfMemoryError", "Sam2UNetError", "UnreadableInputError", "UnsupportedModelError", "error_fields"]

OPTION = "option"
UNREADABLE_INPUT = "unreadable_input"
OUT_OF_MEMORY = "out_of_memory"
UNSUPPORTED_MODEL = "unsupported_model"
KINDS = (OPTION, UNREADABLE_INPUT, OUT_OF_MEMORY, UNSUPPORTED_MODEL)


class Sam2UNetError(Exception):
    """Base of the library's typed errors: ``kind``, ``field`` and ``value`` (see the module
    docstring); ``str(err)`` is the message."""

    kind: ClassVar[str]

    def __init__(self, message: str, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class OptionError(Sam2UNetError, ValueError):
    """An option of a library call is wrong; ``field`` names it, ``value`` is what was given."""

    kind = OPTION


class UnreadableInputError(Sam2UNetError, ValueError):
    """An input image (file or DICOM folder) cannot be read; the message names it."""

    kind = UNREADABLE_INPUT


class OutOfMemoryError(Sam2UNetError, ValueError, MemoryError):
    """Not enough memory (RAM or GPU) for the work; ``field``/``value``: an option and the
    value of it that needs less, when one does."""

    kind = OUT_OF_MEMORY


class UnsupportedModelError(Sam2UNetError, ValueError):
    """A checkpoint or model that cannot be used for this work; the message names the file."""

    kind = UNSUPPORTED_MODEL


def error_fields(err: BaseException) -> dict[str, Any]:
    """``{"kind", "field", "value"}`` of a typed error (``field``/``value`` only when set),
    for event and summary records; ``{}`` for any other exception."""
    if not isinstance(err, Sam2UNetError):
        return {}
    fields: dict[str, Any] = {"kind": err.kind}
    if err.field is not None:
        fields.update(field=err.field, value=err.value)
    return fields
