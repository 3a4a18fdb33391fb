"""Where a driver puts a sweep when `ray job submit --working-dir .` runs it inside Ray's temporary folder.

The end-to-end version (a real `ray job submit`, then a resubmission to a restarted cluster) is in
tests/test_e2e_job.py; these cases pin the rule itself.
"""

from __future__ import annotations

import os

import pytest

from orchestrator.storage import STORAGE_ROOT_ENV, ray_temp_dir_around, resolve_storage_url

JOB_CWD = "/tmp/ray/session_2026-12-07_10-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_outside_a_job_nothing_changes() -> None:
    assert resolve_storage_url("./runs", cwd="/home/me/project", environ={}) == ("./runs", "")
    assert ray_temp_dir_around("/home/me/project") is None


def test_a_relative_path_in_a_job_resolves_under_the_storage_root() -> None:
    url, note = resolve_storage_url("./runs", cwd=JOB_CWD, environ={STORAGE_ROOT_ENV: "/data/me"})
    assert url == "/data/me/runs"
    assert "/data/me" in note and STORAGE_ROOT_ENV in note
    url, _ = resolve_storage_url("file://runs", cwd=JOB_CWD, environ={STORAGE_ROOT_ENV: "/data/me"})
    assert url == "/data/me/runs"


def test_the_default_root_is_in_the_home_folder() -> None:
    url, _ = resolve_storage_url("runs", cwd=JOB_CWD, environ={})
    assert url == os.path.join(os.path.expanduser("~"), "adversarial-sweep", "runs")


def test_a_path_inside_rays_temp_folder_is_refused() -> None:
    assert ray_temp_dir_around(JOB_CWD) == "/tmp/ray"
    for url in ("/tmp/ray/session_latest/runs", "file:///tmp/ray/x"):
        with pytest.raises(ValueError, match="--storage"):
            resolve_storage_url(url, cwd=JOB_CWD, environ={})
    with pytest.raises(ValueError, match="absolute"):
        resolve_storage_url("runs", cwd=JOB_CWD, environ={STORAGE_ROOT_ENV: "relative/root"})


def test_lasting_paths_and_object_storage_pass_unchanged() -> None:
    for url in ("/data/sweeps", "file:///data/sweeps", "s3://bucket/prefix", "/tmp/rays-other/x"):
        assert resolve_storage_url(url, cwd=JOB_CWD, environ={}) == (url, "")
