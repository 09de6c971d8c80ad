"""Text inputs: the bundled splits are disjoint; files that are not text are refused by name."""
import pytest
from aquakv.data import default_texts, read_text_files


def test_bundled_splits_are_disjoint():
    calib, held = default_texts("calibration"), default_texts("evaluation")
    assert calib and held and not set(calib) & set(held)


def test_reads_utf8_and_keeps_a_few_stray_bytes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("héllo wörld ".encode() * 50 + b"\xff")
    (text,) = read_text_files([p])
    assert text.startswith("héllo") and text.endswith("\ufffd")


@pytest.mark.parametrize("content,match", [
    (b"abc\x00def", "binary"),
    (bytes(range(128, 256)) * 10, "not UTF-8"),
    (b"  \n\t", "empty"),
])
def test_refuses_what_is_not_text(tmp_path, content, match):
    p = tmp_path / "x.dat"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        read_text_files([p])
    assert str(p) in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text_files([tmp_path / "none.txt"])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_text_files([tmp_path])
