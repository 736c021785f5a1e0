"""din_ray.io: a published name holds the old or the new complete content, never a part, and a
failed write leaves neither a temporary nor a changed file behind."""

import json

import pytest

from din_ray import io as atomic


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic.write_json(path, {"epoch": 1})
    atomic.write_json(path, {"epoch": 2, "path": tmp_path})  # a Path goes through str()
    assert json.loads(path.read_text()) == {"epoch": 2, "path": str(tmp_path)}
    assert _names(tmp_path) == ["metrics.json"]


def test_a_writer_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "trials.csv"
    atomic.write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert _names(tmp_path) == ["trials.csv"]


def test_staged_dir_swaps_in_the_new_folder_whole(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic.staged_dir(final) as tmp:
        (tmp / "a.pt").write_text("1")
    with atomic.staged_dir(final) as tmp:
        (tmp / "b.pt").write_text("2")
    assert _names(final) == ["b.pt"]  # replaced, not merged
    assert _names(tmp_path) == ["checkpoint"]  # no temporary, no swapped-out copy


def test_staged_dir_that_fails_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "checkpoint"
    with atomic.staged_dir(final) as tmp:
        (tmp / "a.pt").write_text("1")
    with pytest.raises(RuntimeError), atomic.staged_dir(final) as tmp:
        (tmp / "b.pt").write_text("2")
        raise RuntimeError("worker died")
    assert _names(final) == ["a.pt"]
    assert _names(tmp_path) == ["checkpoint"]


def test_write_with_keeps_the_suffix_a_writer_needs(tmp_path):
    seen = []
    atomic.write_with(tmp_path / "fig.png", lambda tmp: (seen.append(tmp.suffix),
                                                         tmp.write_bytes(b"png")), suffix=".png")
    assert seen == [".png"] and (tmp_path / "fig.png").read_bytes() == b"png"
