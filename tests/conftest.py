"""Shared fixtures: one moto S3 stand-in per session, a fresh bucket per test, the digits dataset, and the one
tiny spec every sweep test starts from (`tiny_spec`).

moto and boto3 are imported inside the fixtures, so unit tests that never touch S3 do not pay for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

S3_ACCESS_KEY_ID = "testing-key-id"
S3_SECRET_ACCESS_KEY = "testing-secret-key"
S3_REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port); yields its endpoint URL with the AWS_* environment set."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # port=0 binds a free port; this reports which
    endpoint = f"http://{host}:{port}"
    try:
        # The function-scoped `monkeypatch` fixture cannot serve a session fixture; a MonkeyPatch context can,
        # and restores the environment when the session ends.
        with pytest.MonkeyPatch.context() as mp:
            # A developer's own AWS settings must not leak in: a profile, a session token or an S3-specific
            # endpoint would override the stand-in's.
            for var in (
                "AWS_PROFILE",
                "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL_S3",
                "AWS_REGION",
            ):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_CONFIG_FILE", os.devnull)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
            mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
            mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
            # An HTTP proxy in the environment would otherwise be asked for 127.0.0.1.
            for var in ("NO_PROXY", "no_proxy"):
                mp.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the session's moto server, as ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=s3_server, region_name=S3_REGION).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """scikit-learn's digits converted once per session (32x32, 1 channel); the local dataset path."""
    from workloads.data import digits_to_parquet

    root = tmp_path_factory.mktemp("datasets") / "digits"
    digits_to_parquet(str(root))
    return str(root)


def tiny_spec(name: str, grid: dict[str, Any] | list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """sweeps/tiny.yaml's shape as a dict: bundled digits, a 1/16-width ResNet-18 with the small stem, PGD-1, two
    epochs, one worker of half a CPU (two cells train at once on two cores), a checkpoint every epoch.

    `overrides` replace top-level keys; a mapping merges into the one it replaces, one level down for `workload`
    (so `workload={"recipe": {"epochs": 4}}` changes the epochs and keeps the batch size).
    """
    spec: dict[str, Any] = {
        "name": name,
        "storage": "./runs",
        "workload": {
            "data": {"url": "builtin://digits"},
            "model": {"depth": 18, "norm": "bn", "width": 0.0625, "stem": "small"},
            "attack": {"steps": 1},
            "recipe": {"epochs": 2, "batch_size": 64, "per_worker_batch": 32, "base_lr": 0.4},
            "eval": {"pgd_steps": [1], "subset": 32, "batch_size": 32},
        },
        "grid": grid,
        "resources": {"use_gpu": False, "cpus_per_worker": 0.5, "max_workers_per_cell": 1},
        "planning": {"train_images": 1438, "image_size": 32, "relative_speed": 0.01},
        "checkpoint_every": 1,
        "max_failures": 1,
    }
    for key, value in overrides.items():
        if key == "workload":
            spec[key] = {**spec[key], **{k: {**spec[key].get(k, {}), **v} for k, v in value.items()}}
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    """`spec` as `<folder>/<name>.yaml`."""
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
