"""Secrets at rest: a meeting token is sealed before it is stored in Redis, and unsealed by the
worker that joins the room.

Tavus's private rooms are joined with a meeting token, which is a secret: it never appears in a
log line, an error, a task argument or, in plain text, in Redis. It is sealed with Fernet
(AES-128-CBC + HMAC-SHA256) under ``ECHOQ_SECRET_KEY``, which producers and workers share. Make a
key with::

    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from .errors import ConfigError

KEY_SETTING = "ECHOQ_SECRET_KEY"
#: The conversation record's field that holds the sealed meeting token.
TOKEN_FIELD = "meeting_token_sealed"


def _fernet(key: SecretStr | None, what: str) -> Fernet:
    if key is None or not key.get_secret_value().strip():
        raise ConfigError(f"{what} needs {KEY_SETTING} (the same on producers and workers) to keep it sealed in Redis; "
                          "make one with: python -c \"from cryptography.fernet import Fernet; "
                          "print(Fernet.generate_key().decode())\"")
    try:
        return Fernet(key.get_secret_value().strip().encode())
    except ValueError:
        raise ConfigError(f"{KEY_SETTING} is not a Fernet key (32 url-safe base64-encoded bytes)") from None


def seal(secret: str, key: SecretStr | None) -> str:
    """``secret`` sealed under ``key``, safe to store; :class:`ConfigError` without a key."""
    return _fernet(key, "a meeting token").encrypt(secret.encode()).decode()


def unseal(sealed: str, key: SecretStr | None) -> str:
    """The secret inside ``sealed``; :class:`ConfigError` without the key it was sealed with."""
    try:
        return _fernet(key, "a conversation with a meeting token").decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise ConfigError(f"the meeting token cannot be unsealed with this {KEY_SETTING}: "
                          "producers and workers must share one key") from None
