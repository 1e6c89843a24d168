"""Atomic result files: whole or absent, and readable by whoever the umask lets read them."""
import os
import stat

import pytest

from bench.io import atomic_write_json, atomic_write_text, read_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_result_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what open() gives: the reference
            f.write("x")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "s.json", {"status": "ok"})

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)  # the temporary is written, then the disk fills
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "s.json", '{"status": "fai')
    assert read_json(tmp_path / "s.json") == {"status": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
