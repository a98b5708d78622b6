"""Session ids and the file names they map to.

The contract allows 1-128 characters of ``[A-Za-z0-9._:@-]``. Such an id is
not a safe file name as it stands (``..``, a leading dot, ``:`` on some file
systems, ``Chat`` and ``chat`` being one file on a case-insensitive file
system, 384 bytes once escaped), so every file sessiongate keeps for a session
uses :func:`file_stem`:

- an escaping that yields only ``[a-z0-9._%-]`` and never starts with a dot,
  so no id names a path outside its folder; upper-case letters are escaped
  too (``Chat`` → ``%43hat``), so two ids never differ only in case;
- over :data:`MAX_STEM` characters, the escaped start plus ``~`` and a hash
  of the exact id, so every file name stays far under the usual 255-byte
  limit (suffixes such as ``.jsonl.torn-<time>`` included). Such a name is
  not reversible: the store keeps the id beside it (``<stem>.id``).

Before the case-safe names, upper-case letters were kept as they are;
:func:`existing_file` still finds a file under that older name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ._errors import InvalidSessionId

__all__ = [
    "HASHED_MARK",
    "MAX_STEM",
    "SESSION_ID_PATTERN",
    "existing_file",
    "file_stem",
    "is_valid_session_id",
    "session_id_from_stem",
    "validate_session_id",
]

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_UNSAFE_IN_FILE_NAME = re.compile(r"[^a-z0-9._-]|^\.")
_UNSAFE_BEFORE_CASE_SAFE_NAMES = re.compile(r"[^A-Za-z0-9._-]|^\.")
MAX_STEM = 160
HASHED_MARK = "~"  # never produced by the escaping: marks a shortened, hashed stem
_KEPT_OF_LONG_STEM = 100
_NAME_MAX = 255  # bytes in a file name on common file systems


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid session id, else raise ``InvalidSessionId``."""
    if (
        not isinstance(session_id, str)
        or not SESSION_ID_PATTERN.fullmatch(session_id)
        or session_id in (".", "..")
    ):
        raise InvalidSessionId(str(session_id))
    return session_id


def is_valid_session_id(session_id: object) -> bool:
    """Whether ``session_id`` is valid, without raising."""
    try:
        validate_session_id(session_id)
    except InvalidSessionId:
        return False
    return True


def _escaped(session_id: str, unsafe: re.Pattern[str]) -> str:
    return unsafe.sub(lambda m: f"%{ord(m.group()):02X}", session_id)


def file_stem(session_id: str) -> str:
    """The file name stem for a (validated) session id: case-safe, short, dot-free start."""
    validate_session_id(session_id)
    stem = _escaped(session_id, _UNSAFE_IN_FILE_NAME)
    if len(stem) <= MAX_STEM:
        return stem
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:40]
    return f"{stem[:_KEPT_OF_LONG_STEM]}{HASHED_MARK}{digest}"


def session_id_from_stem(stem: str) -> str | None:
    """Invert :func:`file_stem` (and the older names); ``None`` for a hashed stem (its id is kept beside it)."""
    if HASHED_MARK in stem:
        return None
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), stem)


def existing_file(directory: Path, session_id: str, suffix: str) -> Path:
    """``<directory>/<file_stem><suffix>``, or the file's name from before case-safe names while only that exists."""
    stem = file_stem(session_id)
    path = directory / f"{stem}{suffix}"
    older = _escaped(session_id, _UNSAFE_BEFORE_CASE_SAFE_NAMES)
    if older != stem and len(older) + len(suffix) <= _NAME_MAX and not path.exists():
        kept = directory / f"{older}{suffix}"
        if kept.exists():
            return kept
    return path
