"""Key secrets and their digests: generation (`es-` + 43 random characters), HMAC-SHA256 with the
server-side pepper (the key itself is never stored), and the pepper file."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from embedserve.errors import ConfigError

log = logging.getLogger("embedserve.keys")

KEY_PREFIX = "es-"
PREFIX_CHARS = 8  # shown in listings and logs: "es-" + the first 5 random characters
PEPPER_FILE = "key-pepper"
_PEPPER_CHECK = b"embedserve pepper check v1"


def generate_key() -> str:
    """A new secret: `es-` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(pepper: bytes, key: str) -> bytes:
    """HMAC-SHA256(pepper, key): what is stored and looked up. Without the pepper, a stolen database
    gives nothing to test guesses against."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).digest()


def pepper_check(pepper: bytes) -> str:
    return hmac.new(pepper, _PEPPER_CHECK, hashlib.sha256).hexdigest()


def load_pepper(configured: str | None, data_dir: Path) -> bytes:
    """The setting's pepper, else the one in `<data-dir>/key-pepper`, created (mode 0600) on first use."""
    if configured:
        return configured.encode("utf-8")
    path = data_dir / PEPPER_FILE
    if not path.exists():
        try:
            _create_pepper(path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            raise ConfigError(f"cannot create the key pepper file {path}: {exc}") from None
        else:
            log.info(
                "created the key pepper %s (keep it with the database: keys cannot be checked without it)",
                path,
            )
    try:
        pepper = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the key pepper file {path}: {exc}") from None
    if not pepper:
        raise ConfigError(f"the key pepper file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("the key pepper file %s is readable by others; chmod 600 it", path)
    return pepper


def _create_pepper(path: Path) -> None:
    """Written in full to a private temporary file, then linked into place: a process starting at the
    same moment sees either no pepper or the whole one, never a half-written file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode("ascii") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails with FileExistsError if another process won
    finally:
        tmp.unlink(missing_ok=True)
