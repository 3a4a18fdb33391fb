"""One storage setting for both S3 clients: sweep records (fsspec/s3fs) and Ray Train checkpoints (pyarrow) must
reach the same store whichever of AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL is set, against a real S3 protocol
server (moto, tests/conftest.py). And every storage scheme the spec accepts is one Ray Train can write to."""

from __future__ import annotations

import pytest

from orchestrator.spec import STORAGE_SCHEMES, SpecError, parse_spec
from orchestrator.storage import SweepStorage
from workloads.fs import S3Settings

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers S3 there


@pytest.mark.parametrize(
    ("s3_specific", "general"),
    [("moto", None), (None, "moto"), ("moto", UNREACHABLE)],
    ids=["AWS_ENDPOINT_URL_S3 alone", "AWS_ENDPOINT_URL alone", "both: the S3-specific one wins"],
)
def test_records_and_checkpoints_reach_the_same_store(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, s3_specific: str | None, general: str | None
) -> None:
    for variable, value in (("AWS_ENDPOINT_URL_S3", s3_specific), ("AWS_ENDPOINT_URL", general)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, s3_server if value == "moto" else value)
    storage = SweepStorage.for_sweep(f"{s3_bucket}/sweeps", "s")
    storage.write_json(storage.cell_path("abc", "result.json"), {"written": "by the driver"})

    root, filesystem = storage.ray_storage()  # what Ray Train gets for the cells' checkpoints
    assert filesystem is not None
    with filesystem.open_input_stream(f"{root}/abc/result.json") as f:
        assert b"by the driver" in f.read()
    with filesystem.open_output_stream(f"{root}/abc/checkpoint_0/state.pt") as f:
        f.write(b"weights")
    assert storage.fs.cat_file(storage.cell_path("abc", "checkpoint_0", "state.pt")) == b"weights"


def test_settings_follow_botocores_precedence() -> None:
    both = {"AWS_ENDPOINT_URL_S3": "http://s3.local", "AWS_ENDPOINT_URL": "http://all.local", "AWS_REGION": "eu-1"}
    assert S3Settings.from_environment(both) == S3Settings("http://s3.local", "eu-1")
    general = {"AWS_ENDPOINT_URL": "http://all.local", "AWS_DEFAULT_REGION": "us-2"}
    assert S3Settings.from_environment(general) == S3Settings("http://all.local", "us-2")
    assert S3Settings.from_environment({"AWS_ENDPOINT_URL_S3": " "}) == S3Settings(None, None)


def test_every_accepted_scheme_is_one_ray_train_can_write_to(tmp_path: object) -> None:
    for scheme in STORAGE_SCHEMES:
        root, filesystem = SweepStorage(f"{scheme}://bucket/prefix/s").ray_storage()
        assert root.endswith("/cells")
        assert (filesystem is None) == (scheme == "file")


@pytest.mark.parametrize("url", ["gs://bucket/p", "az://container/p", "memory://sweeps", "hdfs://nn/p"])
def test_other_schemes_are_refused_at_validation_naming_the_supported_ones(url: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(f"name: s\nstorage: {url}\nworkload: {{data: {{url: builtin://digits}}}}\n")
    assert "is not one of file://, s3:// (or a local path)" in str(err.value)
