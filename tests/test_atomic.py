"""Atomic outputs appear whole, with the mode a plain open() would give them."""
import os
import stat

import pytest

from metaldefect.atomic import atomic_open, staged_directory, write_text


def test_written_file_has_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o666 & ~old


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_staged_directory_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "outputs"
    with staged_directory(out) as staging:
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "b.txt").write_text("b")
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
