"""Credentials from the environment never reach an error text the sweep stores or prints."""

from __future__ import annotations

import pytest

from orchestrator.redact import MASK, redact

SECRET = "wJalrXUtnFEMI-test-secret-value"
KEY_ID = "AKIA-test-key-id-0001"


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("PWD", "/work/main")


def test_environment_credentials_are_masked() -> None:
    text = f"ClientError: signature for {KEY_ID} with secret {SECRET} rejected"
    out = redact(text)
    assert SECRET not in out and KEY_ID not in out
    assert out.count(MASK) == 2
    assert out.startswith("ClientError: signature for ")


def test_ordinary_values_are_left_alone() -> None:
    text = "could not read /work/main/data in region us-east-1"
    assert redact(text) == text


def test_presigned_url_signatures_are_masked() -> None:
    url = "https://s3.example/b/k?X-Amz-Credential=abc%2F2026&X-Amz-Signature=deadbeef&X-Amz-Expires=60"
    out = redact(f"GET {url} failed")
    assert "deadbeef" not in out and "abc%2F2026" not in out
    assert "X-Amz-Expires=60" in out
