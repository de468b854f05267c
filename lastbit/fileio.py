"""Atomic file writes: a reader never sees a half-written file, a failure leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


def atomic_write_bytes(path: "str | Path", data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: "str | Path", text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: "str | Path", obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: "str | Path", array: np.ndarray) -> Path:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())



def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (for atomic_write_bytes), closing the figure."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- whole directories (bundles, exports): built beside the destination, renamed into place ---


def check_replaceable_dir(out_dir: Path, manifest: str, format_tag: str, what: str,
                          owned_files: "Callable[[dict], Iterable[str]] | None" = None) -> None:
    """Only a missing or empty directory, or one holding an earlier output of the same kind
    and nothing else, may be replaced: a mistyped out_dir must never cost the user a
    directory of their own, nor files they added to an earlier output.

    An earlier output is recognised by its ``manifest`` JSON (``"format": format_tag``); the
    files it owns are the manifest and ``owned_files(manifest)`` (default: the keys of its
    ``"files"``).  Anything else in the folder makes this raise ArtifactError naming it.
    """
    from lastbit.errors import ArtifactError

    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a directory; refusing to replace it")
    if not any(out_dir.iterdir()):
        return
    try:
        previous = json.loads((out_dir / manifest).read_text())
        ours = previous.get("format") == format_tag
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ArtifactError(f"{out_dir}: exists and is not {what}; refusing to replace it")
    try:
        owned = set(owned_files(previous) if owned_files else previous.get("files", {})) | {manifest}
    except (KeyError, TypeError, AttributeError):
        owned = {manifest}
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir() if p.name not in owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArtifactError(f"{out_dir}: holds {what} plus files lastbit did not write ({shown}); replacing it "
                            f"would delete them: move them out of the folder, or write to another one")


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished directory ``new`` to ``dest``; an old ``dest`` goes only after that."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.rename(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: Path):
    """Yield a fresh directory beside ``out_dir`` to fill; on success it replaces ``out_dir``
    (made world-readable: outputs are meant to be copied around), on any failure it is
    removed and ``out_dir`` is untouched. Check ``out_dir`` with :func:`check_replaceable_dir`
    before the expensive work."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
