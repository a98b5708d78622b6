"""Session ids: the contract's alphabet, and file stems that never leave their folder."""

from __future__ import annotations

import os
import string

import pytest

from sessiongate._errors import InvalidSessionId
from sessiongate._ids import (
    HASHED_MARK,
    MAX_STEM,
    file_stem,
    is_valid_session_id,
    session_id_from_stem,
    validate_session_id,
)

VALID = ["a", "chat:42", "telegram:-100123", "user@example.com", "A.b_c-d", "..a", ".hidden", "x" * 128]
INVALID = ["", ".", "..", "a b", "x" * 129, "nul\0", "a/b", "a/../b", "../x", "/etc", "é", "a\\b", "a\n", "%41", None, 42]


@pytest.mark.parametrize("session_id", VALID)
def test_valid_ids(session_id: str) -> None:
    assert validate_session_id(session_id) == session_id and is_valid_session_id(session_id)


@pytest.mark.parametrize("session_id", INVALID)
def test_invalid_ids(session_id: object) -> None:
    assert not is_valid_session_id(session_id)
    with pytest.raises(InvalidSessionId) as error:
        validate_session_id(session_id)
    assert error.value.session_id is None  # never echoed back as a session


@pytest.mark.parametrize("session_id", VALID)
def test_file_stem_is_reversible_and_stays_in_its_folder(session_id: str) -> None:
    stem = file_stem(session_id)
    assert session_id_from_stem(stem) == session_id
    assert not stem.startswith(".") and os.sep not in stem
    assert set(stem) <= set(string.ascii_letters + string.digits + "._-%")
    folder = "/data/sessions"
    assert os.path.dirname(os.path.normpath(os.path.join(folder, stem + ".jsonl"))) == folder


def test_distinct_ids_get_distinct_stems() -> None:
    assert len({file_stem(session_id) for session_id in VALID}) == len(VALID)
    assert file_stem("a:b") == "a%3Ab" and not is_valid_session_id("a%3Ab")  # escapes cannot collide


@pytest.mark.parametrize("session_id", ["..", "a/../b", "x" * 200])
def test_file_stem_refuses_invalid_ids(session_id: str) -> None:
    with pytest.raises(InvalidSessionId):
        file_stem(session_id)


def test_long_ids_get_short_hashed_stems_and_case_never_merges_two_ids() -> None:
    long_ids = ["u@x:" * 32, "u@x:" * 31 + "u@y:", ":" * 128]
    stems = [file_stem(session_id) for session_id in long_ids]
    assert len(set(stems)) == len(long_ids)
    assert all(len(stem) <= MAX_STEM and HASHED_MARK in stem for stem in stems)
    assert all(session_id_from_stem(stem) is None for stem in stems)  # the store keeps the id beside the file
    folded = {file_stem(session_id).lower() for session_id in ("Chat", "chat", "CHAT", "cHat")}
    assert len(folded) == 4  # distinct even where the file system ignores case
