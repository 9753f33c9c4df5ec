"""Files that hold secrets (the xDS secret, admin tokens, rendered Envoy bootstraps): created 0600 in
directories created 0700, never world-readable even for a moment (the mode is set at creation)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) as needed; a directory this creates is 0700."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return path


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 (an existing file is truncated and its mode reset)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    return path


def read_secret(path: Path) -> str:
    """The secret in `path`, surrounding whitespace removed; OSError if unreadable, ValueError if empty."""
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def load_or_create_secret(path: Path, nbytes: int = 32) -> tuple[str, bool]:
    """The secret in `path`, or a new random one written there (0600). Returns it and whether it is new."""
    with contextlib.suppress(FileNotFoundError):
        return read_secret(path), False
    private_dir(path.parent)
    value = secrets.token_urlsafe(nbytes)
    try:
        # O_EXCL: two processes racing to create it must not end up with different secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path), False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value, True
