"""The admin token: where it comes from, how it is stored, how clients send it."""

from __future__ import annotations

import os
import pathlib
import secrets

TOKEN_ENV = "CLOWDER_ADMIN_TOKEN"
TOKEN_FILE = "admin-token"


def token_path(data_dir: str | os.PathLike[str]) -> pathlib.Path:
    return pathlib.Path(data_dir) / TOKEN_FILE


def ensure_admin_token(data_dir: str | os.PathLike[str]) -> str:
    """Return the admin token: the environment's, else the stored one, else a new one stored 0600.

    There is no built-in default: a cluster without a token of its own never starts.
    """
    return ensure_secret(TOKEN_ENV, token_path(data_dir))


def ensure_secret(env: str, path: pathlib.Path) -> str:
    """A cluster secret: the environment variable `env`'s value, else the one stored at `path`, else a new
    random one stored there with mode 0600."""
    from_env = os.environ.get(env, "").strip()
    if from_env:
        return from_env
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL + mode 0600 at creation: the secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def read_admin_token(data_dir: str | os.PathLike[str] | None) -> str | None:
    """For clients: the environment's token, else the one `clowder up` stored."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    if data_dir is None:
        return None
    path = token_path(data_dir)
    return path.read_text().strip() if path.exists() else None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
