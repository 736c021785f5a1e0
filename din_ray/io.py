"""Atomic, durable writes: every file or folder din-ray publishes goes through here.

A reader (a resumed run, a Serve replica, the next day's job) must never see half a file, and a
crash must never leave a published name pointing at unwritten data. So everything is written to
a hidden temporary sibling first (same folder, so the rename cannot cross file systems), its
contents are fsynced, it is renamed over the final name, and the rename itself is fsynced (the
parent folder's entry).

    write_text(path, text)            a text file
    write_json(path, obj)             JSON, indented, newline-terminated
    write_with(path, writer)          anything a writer(tmp_path) produces (torch.save, savefig)
    with staged_dir(final) as tmp:    a folder: filled in `tmp`, published on success (replacing
        ...                           a previous `final`), removed on error
    publish(tmp, final)               the rename step on its own, for a complete tmp you built
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(final: str | Path, suffix: str = "") -> Path:
    """A hidden, unique name beside `final` (pid and time: concurrent writers never collide).
    `suffix` keeps an extension where the writer picks the format from it (savefig)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}{suffix}")


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk (a read-only descriptor suffices)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: str | Path) -> None:
    """fsync every file and folder under `directory`, itself last: call before the rename that
    publishes it, so a crash after the rename cannot leave names pointing at unwritten data."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def publish(tmp: str | Path, final: str | Path) -> None:
    """Rename the complete file or folder `tmp` to `final` durably: contents on disk before the
    rename, the rename on disk after it. An existing `final` file is replaced atomically; an
    existing folder is swapped out first (a folder cannot be renamed over a non-empty one) and
    deleted after, so `final` names the old or the new complete copy at every instant but one
    rename apart."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        sync_tree(tmp)
    else:
        fsync_path(tmp)
    trash = None
    if tmp.is_dir() and final.is_dir():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_with(path: str | Path, writer: Callable[[Path], object], suffix: str = "") -> Path:
    """Publish what `writer(tmp)` writes to a temporary sibling of `path`; nothing is left
    behind if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, suffix)
    try:
        writer(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj, default: Callable | None = str) -> Path:
    """`obj` as indented JSON; values JSON cannot hold go through `default` (str by default)."""
    return write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def copy_file(source: str | Path, dest: str | Path) -> Path:
    return write_with(dest, lambda tmp: shutil.copyfile(source, tmp))


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; publish it as `final` (replacing any
    previous one) when the block ends normally, delete it when the block raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
