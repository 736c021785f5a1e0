"""Who may call the Serve app: the API token, where it comes from, and when one is required.

The server binds 127.0.0.1 by default. Any other address needs an API token (`--token-file`, or
the DIN_RAY_SERVE_TOKEN environment variable) unless the user passes `--insecure`. Clients send
the token as `Authorization: Bearer <token>`. Only the token's SHA-256 reaches the Serve config
and the replicas.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

TOKEN_ENV = "DIN_RAY_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # guessing must stay hopeless: only the token's SHA-256 is checked


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def access_token(host: str, token_file: str | None, insecure: bool,
                 environ: dict[str, str] | None = None) -> str | None:
    """The API token for a server binding `host`: read from `token_file`, else the
    DIN_RAY_SERVE_TOKEN environment variable; None when there is none.

    Raises:
        ValueError: `host` is not loopback and there is no token and no `insecure`; or the
            token is shorter than MIN_TOKEN_CHARS characters.
    """
    environ = os.environ if environ is None else environ
    if token_file is not None:
        token, source = Path(token_file).read_text().strip(), token_file
    else:
        token, source = environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if token and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{source}: the API token has {len(token)} characters; use at least "
                         f"{MIN_TOKEN_CHARS} (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'`)")
    if not token and not is_loopback(host) and not insecure:
        raise ValueError(f"--host {host} accepts connections from other machines: give an API "
                         f"token with --token-file or ${TOKEN_ENV}, or pass --insecure to "
                         "serve without one")
    return token or None
