"""Keep credentials out of everything the sweep writes or prints.

Credentials reach the processes only through the environment (docs/design.md section 4). An error message can still echo
one (a botocore error quoting a signed URL, an exception that prints the environment), so every error text that
goes to storage or to the log passes through `redact`, which masks the value of every environment variable whose
name says it is a credential.
"""

from __future__ import annotations

import os
import re

from orchestrator.credentials import looks_like_credential_name

MASK = "***"
_MIN_SECRET_LENGTH = 4  # shorter values ("1", "true") would mask innocent text and protect nothing
_NOT_SECRETS = frozenset({"PWD", "OLDPWD"})  # "pwd" reads as password, but these are the shell's directories


def secret_values() -> list[str]:
    values = {
        value
        for name, value in os.environ.items()
        if name not in _NOT_SECRETS and looks_like_credential_name(name) and len(value) >= _MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    # Presigned URLs carry a signature and, for temporary credentials, a session token in the query string.
    return re.sub(r"(?i)(X-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"']+", rf"\1{MASK}", text)
