"""Credentials never belong in a spec, a manifest or a log: what names and what text look like one.

The spec parser rejects them (orchestrator.spec), `deploy check` scans the manifests with the same rules, and
`orchestrator.redact` blanks values of credential-named variables in anything printed or stored.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

CREDENTIALS_HINT = (
    "credentials must come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL), never from the spec"
)


_CREDENTIAL_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "key",
        "keys",
        "apikey",
        "accesskey",
        "secretkey",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "signature",
        "sig",
        "sas",
        "bearer",
        "cookie",
    }
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET_SHAPE = re.compile(r"[A-Za-z0-9/+=]{40}")
_JWT_SHAPE = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return re.findall(r"[a-z0-9]+", spaced.lower())


def looks_like_credential_name(name: str) -> bool:
    """True for names like aws_secret_access_key, secretKey, session_token, password, key, X-Amz-Signature."""
    words = _words(name)
    return bool(_CREDENTIAL_WORDS.intersection(words)) or "".join(words) in _CREDENTIAL_WORDS


def credential_in_text(text: str) -> str | None:
    """Why `text` looks like it carries a credential (never the credential itself), or None."""
    if _AWS_KEY_ID.search(text):
        return "an AWS access key id"
    if "-----BEGIN" in text and "KEY" in text:
        return "a private key"
    if _JWT_SHAPE.search(text):
        return "a bearer token"
    if (
        _AWS_SECRET_SHAPE.fullmatch(text)
        and re.search(r"[a-z]", text)
        and re.search(r"[A-Z]", text)
        and re.search(r"[0-9]", text)
    ):
        return "a secret access key"
    if "://" in text:
        try:
            parts = urlsplit(text)
        except ValueError:
            return None
        # '@' in the authority, or a user:password whose password holds a '/' (which ends the authority).
        head = text.split("://", 1)[1].split("@", 1)
        if "@" in parts.netloc or (len(head) == 2 and ":" in head[0]):
            return "a user name or password in the URL"
        for param, _ in parse_qsl(parts.query, keep_blank_values=True):
            if looks_like_credential_name(param) or param.lower().startswith("x-amz-"):
                return f"a credential query parameter {param!r} in the URL"
    return None
