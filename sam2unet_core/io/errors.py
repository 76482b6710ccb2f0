"""Texts of exceptions for the messages users read: never empty.

``str(KeyError(''))`` is ``"''"`` and ``str(MemoryError())`` is ``""``; readers and writers
turn what the parsing libraries raise into a ``ValueError`` naming the file with
:func:`error_text`, so such an exception never reaches the user as an empty message.
"""

from __future__ import annotations

__all__ = ["error_text"]


def error_text(err: BaseException) -> str:
    """``"<type>: <text>"`` of ``err`` (the text alone for ``ValueError``/``OSError``, whose
    texts say what is wrong), with ``"no details given"`` where the exception has no text."""
    text = str(err).strip()
    if isinstance(err, KeyError):  # str() of a KeyError is the repr of the key: "''" for ''
        text = f"missing key {err.args[0]!r}" if err.args and str(err.args[0]).strip() else ""
    if not text:
        return f"{type(err).__name__}: no details given"
    if isinstance(err, (ValueError, OSError)):
        return text
    return f"{type(err).__name__}: {text}"
