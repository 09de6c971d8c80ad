"""Atomic writes: complete or untouched, no temporary file left behind, permissions from the umask."""
import os

import pytest
from aquakv.files import atomic_path, write_json_atomic, write_text_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_text_atomic(target, "old")
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_refuses_a_directory_or_a_missing_parent(tmp_path):
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text_atomic(tmp_path / "nope" / "f", "x")
