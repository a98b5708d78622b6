"""Session ids and the file names they map to.

The contract allows 1-128 characters of ``[A-Za-z0-9._:@-]``. Such an id is
not a safe file name as it stands (``..``, a leading dot, ``:`` on some file
systems), so every file sessiongate keeps for a session uses
:func:`file_stem`, a reversible escaping that yields only ``[A-Za-z0-9._%-]``
and never starts with a dot: no id can name a path outside its folder.
"""

from __future__ import annotations

import re

from ._errors import InvalidSessionId

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]|^\.")


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


def file_stem(session_id: str) -> str:
    """The file name stem for a (validated) session id: reversible, dot-free start."""
    validate_session_id(session_id)
    return _UNSAFE_IN_FILE_NAME.sub(lambda m: f"%{ord(m.group()):02X}", session_id)


def session_id_from_stem(stem: str) -> str:
    """Invert :func:`file_stem` (used by the operator CLI to name sessions)."""
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), stem)
