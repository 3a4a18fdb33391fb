"""Checkpoint I/O: our save/restore path to S3 (moto on loopback) against a plain `s3fs` put/get of the same bytes.

`.venv/bin/python -m benchmarks.checkpoint_io [--repeats 7] [--small-repeats 15] [--threads 1]`

The S3 stand-in is moto's `ThreadedMotoServer` on 127.0.0.1, as in tests/conftest.py, but in a child process:
in this process its request handling (pure Python) would compete for the GIL with s3fs's event loop (Python) and
not with pyarrow's C++ client, which would favour our path. Test credentials only; the AWS_* variables are set
for the benchmark and restored afterwards. Both paths go through the same server, whose own cost (it keeps
every object in memory or a spooled temp file) is part of both times, so the ratios understate a gap that a real
S3 endpoint would show in either direction.

States, as `workloads.train.training_state` builds them (model `state_dict`, SGD state with momentum buffers after one
step, attack and torch RNG states, epoch, train seconds):

- **large**: ResNet-50 (ImageNet stem, width 1, 1000 classes): ~205 MB, the size of a real cell's checkpoint.
- **small**: the smoke sweep's model (ResNet-18, width 1/8, small stem, 1 channel, 10 classes): ~1.4 MB, where
  per-request overhead (directory marker, HEADs) dominates.

Cases, interleaved (`_common.interleave`, the order rotating between rounds), one new destination per save:

- **ours, save** = what `RaySession.report` + `RaySession._upload` do per checkpoint: `tempfile.mkdtemp`,
  `torch.save` into it, then `workloads.sessions.upload_checkpoint` (the function `_upload` calls with the
  destination it reads from the Ray Train context: `target.create_dir(destination)` and `pyarrow.fs.copy_files`
  inside `workloads.fs.with_retries`) to the pyarrow `S3FileSystem` that `SweepStorage.ray_storage()` returns,
  then the local folder's removal (`delete_local_checkpoint_after_upload`). The local write and the upload are
  also timed separately.
- **s3fs, save** = `torch.save` to an in-memory buffer + `s3fs` `pipe_file` of its bytes (the `open_fs`
  filesystem; one PUT below 100 MB, else a 50 MB-part multipart upload, 10 parts at a time).
- **ours, restore** = `RaySession._load` (product code, a static method that needs no Train context) on
  `ray.train.Checkpoint(path, filesystem=<the same S3FileSystem>)`: `Checkpoint.as_directory()` downloads the
  folder to a temporary directory (`pyarrow.fs.copy_files`, 64 MiB chunks, threads) and `torch.load`s it,
  inside `with_retries`.
- **s3fs, restore** = `s3fs` `cat_file` of the same object + `torch.load` from memory.

Ratio = s3fs time / our time, median of per-round ratios (goal >= 0.8, i.e. our path at least 80 % of the
plain client's throughput). MB/s = checkpoint bytes (10^6) / median wall seconds.

Blocking: with `CheckpointUploadMode.ASYNC`, `ray.train.report` hands the upload to Ray Train's one upload
thread (`MAX_CHECKPOINT_UPLOAD_THREADS = 1`, Ray 2.60) and returns after the cross-rank barrier, so a
checkpoint blocks training for the local `torch.save` only; a synchronous report would block for save + upload.
Both are reported, with the upload's CPU seconds in this process (pyarrow's threads; the server is elsewhere):
what the background upload takes from the training process's cores meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    DEFAULT_THREADS,
    Check,
    Timings,
    format_table,
    interleave,
    load_average,
    markdown_table,
    median,
    paired_ratio,
    print_checks,
    set_torch_threads,
)
from orchestrator.storage import SweepStorage
from workloads.config import ModelConfig, RecipeConfig
from workloads.fs import open_fs
from workloads.models import build_model
from workloads.sessions import STATE_FILE, RaySession, upload_checkpoint
from workloads.train import training_state as checkpoint_state

NAME = "checkpoint_io"
GOAL = 0.8
MB = 1e6
S3_ACCESS_KEY_ID = "testing-key-id"  # the moto stand-in's test credentials, as in tests/conftest.py
S3_SECRET_ACCESS_KEY = "testing-secret-key"
S3_REGION = "us-east-1"
STATES: dict[str, tuple[ModelConfig, int, int]] = {
    # name: (model, classes, input channels)
    "large": (ModelConfig(depth=50, norm="bn", width=1.0, stem="imagenet"), 1000, 3),
    "small": (ModelConfig(depth=18, norm="bn", width=0.125, stem="small"), 10, 1),
}
CASES = ("ours save", "s3fs save", "ours restore", "s3fs restore")

_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin (or exits)
server.stop()
"""


@dataclass(frozen=True)
class StandIn:
    """A running S3 stand-in: a fresh bucket, and the server's request log."""

    bucket: str  # s3://<name>
    log: Path

    def requests(self) -> int:
        """Requests the server has answered so far (it logs each one just after answering it)."""
        time.sleep(0.2)
        return self.log.read_text().count(" HTTP/1.1")


@contextlib.contextmanager
def s3_stand_in() -> Iterator[StandIn]:
    """moto's S3 server on 127.0.0.1 (a free port) in a child process, with a new bucket; the AWS_* environment of
    tests/conftest.py is set for this process meanwhile, and restored afterwards."""
    with contextlib.ExitStack() as stack:
        log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-moto-"))) / "requests.log"
        with open(log, "a") as out:  # append mode: our reads never move the child's write position
            child = subprocess.Popen(
                [sys.executable, "-c", _MOTO_CHILD],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
            )
        stack.callback(_stop, child)
        assert child.stdout is not None
        port = child.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the moto server did not start: {log.read_text()[-2000:]}")
        endpoint = f"http://127.0.0.1:{port}"
        saved = dict(os.environ)
        stack.callback(_restore_environment, saved)
        # A developer's own AWS settings must not leak in (a profile, a session token, an S3-specific endpoint).
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            os.environ.pop(var, None)
        os.environ |= {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
        }
        for var in ("NO_PROXY", "no_proxy"):
            os.environ[var] = ",".join(filter(None, [saved.get(var), "127.0.0.1", "localhost"]))
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:16]}"
        boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION).create_bucket(Bucket=bucket)
        yield StandIn(f"s3://{bucket}", log)


def _stop(child: subprocess.Popen[str]) -> None:
    if child.stdin is not None:
        child.stdin.close()  # the server's signal to stop
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _restore_environment(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


def training_state(model: ModelConfig, num_classes: int, in_channels: int) -> dict[str, Any]:
    """What `workloads.train.run` checkpoints: `workloads.train.training_state` of a model whose SGD optimizer has
    taken one step (so the momentum buffers exist, as in every checkpoint after the first step)."""
    torch.manual_seed(0)
    bare = build_model(model, num_classes, in_channels)
    recipe = RecipeConfig()
    optimizer = torch.optim.SGD(
        bare.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    for p in bare.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return checkpoint_state(bare, optimizer, torch.Generator().manual_seed(0), epoch=1, train_seconds=1.0)


OnResult = Callable[[str, dict[str, Any]], None]


def _cases(state: dict[str, Any], bucket: str, label: str) -> tuple[dict[str, Callable[[], Any]], OnResult, int]:
    """The four cases for one state, the `on_result` hook that deletes what a save wrote (outside the timing),
    and the size of the state file in bytes."""
    import pyarrow.fs
    import ray.train

    storage_path, target = SweepStorage.for_sweep(bucket, f"bench-{label}").ray_storage()
    assert target is not None, "ray_storage() gives a filesystem for s3:// storage"
    run_path = f"{storage_path}/cell"  # Ray Train: <storage_path>/<run name>/checkpoint_<...>
    fs, root = open_fs(f"{bucket}/plain-{label}")
    counter = itertools.count()

    def ours_save() -> dict[str, Any]:
        name = f"checkpoint_{next(counter):06d}"
        wall0, cpu0 = time.perf_counter(), time.process_time()
        folder = tempfile.mkdtemp(prefix="sweep-checkpoint-")
        torch.save(state, Path(folder) / STATE_FILE)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        destination = f"{run_path}/{name}"
        upload_checkpoint(folder, pyarrow.fs.LocalFileSystem(), destination, target, name)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        shutil.rmtree(folder)
        return {
            "delete": lambda: target.delete_dir(destination),
            "write_wall": wall1 - wall0,
            "write_cpu": cpu1 - cpu0,
            "upload_wall": wall2 - wall1,
            "upload_cpu": cpu2 - cpu1,
        }

    def s3fs_save() -> dict[str, Any]:
        path = f"{root}/{next(counter):06d}/{STATE_FILE}"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fs.pipe_file(path, buffer.getvalue())
        return {"delete": lambda: fs.rm_file(path)}

    # The object both restores read: one checkpoint written by our path, kept for the whole benchmark.
    kept = f"{run_path}/checkpoint_restore"
    folder = tempfile.mkdtemp(prefix="sweep-checkpoint-")
    torch.save(state, Path(folder) / STATE_FILE)
    size = (Path(folder) / STATE_FILE).stat().st_size
    upload_checkpoint(folder, pyarrow.fs.LocalFileSystem(), kept, target, "restore")
    shutil.rmtree(folder)
    kept_file = f"{kept}/{STATE_FILE}"

    def ours_restore() -> dict[str, Any]:
        return {"state": RaySession._load(ray.train.Checkpoint(kept, filesystem=target))}

    def s3fs_restore() -> dict[str, Any]:
        raw = fs.cat_file(kept_file)
        return {"state": torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)}

    def on_result(case: str, result: dict[str, Any]) -> None:
        if "delete" in result:
            result.pop("delete")()
        if "state" in result:
            loaded = result.pop("state")
            if loaded["epoch"] != state["epoch"] or loaded["model"].keys() != state["model"].keys():
                raise RuntimeError(f"{case}: the restored state differs from the saved one")

    cases = {"ours save": ours_save, "s3fs save": s3fs_save, "ours restore": ours_restore, "s3fs restore": s3fs_restore}
    return cases, on_result, size


def measure(state: dict[str, Any], stand_in: StandIn, label: str, repeats: int) -> dict[str, Any]:
    cases, on_result, size = _cases(state, stand_in.bucket, label)
    phases: dict[str, list[float]] = {"write_wall": [], "write_cpu": [], "upload_wall": [], "upload_cpu": []}

    def record(case: str, result: dict[str, Any]) -> None:
        on_result(case, result)
        for key in phases:
            if key in result:
                phases[key].append(result[key])

    timings = interleave(cases, repeats, warmup=1, on_result=record)
    # The warm-up round's phases are recorded too; keep the timed rounds only.
    phases = {k: v[-repeats:] for k, v in phases.items()}
    # One more call of each, untimed, counting the requests the server answers for it.
    requests = {}
    for name, case in cases.items():
        before = stand_in.requests()
        result = case()
        requests[name] = stand_in.requests() - before
        on_result(name, result)
    return summarize(timings, phases, size) | {"requests": requests}


def summarize(timings: dict[str, Timings], phases: dict[str, list[float]], size: int) -> dict[str, Any]:
    save_ratio = paired_ratio(timings["s3fs save"].wall, timings["ours save"].wall)
    restore_ratio = paired_ratio(timings["s3fs restore"].wall, timings["ours restore"].wall)
    blocked_fraction = median([w / t for w, t in zip(phases["write_wall"], timings["ours save"].wall, strict=True)])
    return {
        "bytes": size,
        "cases": {
            name: {
                "wall_seconds": median(t.wall),
                "cpu_seconds": median(t.cpu),
                "mb_per_second": size / MB / median(t.wall),
            }
            for name, t in timings.items()
        },
        "save_ratio": save_ratio,
        "restore_ratio": restore_ratio,
        "blocked_seconds": median(phases["write_wall"]),
        "blocked_cpu_seconds": median(phases["write_cpu"]),
        "upload_seconds": median(phases["upload_wall"]),
        "upload_cpu_seconds": median(phases["upload_cpu"]),
        "sync_seconds": median(timings["ours save"].wall),
        "blocked_fraction": blocked_fraction,
    }


def _what(label: str, size: int) -> str:
    model = STATES[label][0]
    return f"ResNet-{model.depth} width {model.width:g}, {size / MB:.1f} MB"


def run(repeats: int = 7, small_repeats: int = 15, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    threads = set_torch_threads(threads)
    load_before = load_average()
    sizes: dict[str, dict[str, Any]] = {}
    with s3_stand_in() as stand_in:
        for label, (model, classes, channels) in STATES.items():
            state = training_state(model, classes, channels)
            sizes[label] = measure(state, stand_in, label, repeats if label == "large" else small_repeats)
            del state
    load_after = load_average()
    checks = []
    for label, r in sizes.items():
        goal = f">= {GOAL}" if label == "large" else ""
        for direction in ("save", "restore"):
            ratio = r[f"{direction}_ratio"]
            ours, plain = r["cases"][f"ours {direction}"], r["cases"][f"s3fs {direction}"]
            checks.append(
                Check(
                    NAME,
                    f"{direction} ({_what(label, r['bytes'])}): s3fs time / our time",
                    f"{ratio:.2f} ({ours['mb_per_second']:.0f} vs s3fs {plain['mb_per_second']:.0f} MB/s)",
                    goal,
                    ratio >= GOAL if goal else None,
                )
            )
    large = sizes["large"]
    checks.append(
        Check(
            NAME,
            "training blocked per checkpoint (ResNet-50) with the ASYNC upload: the local torch.save, of a "
            "synchronous save + upload",
            f"{large['blocked_seconds']:.2f} s of {large['sync_seconds']:.2f} s ({large['blocked_fraction']:.0%})",
            "the local write only",
            None,
        )
    )
    return {
        "name": NAME,
        "setup": {
            "states": {label: {**STATES[label][0].model_dump(), "classes": STATES[label][1]} for label in STATES},
            "repeats": {"large": repeats, "small": small_repeats},
            "torch_threads": threads,
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        },
        "sizes": sizes,
        "checks": checks,
    }


TABLE_HEADERS = ["state", "case", "wall s", "CPU s", "MB/s", "s3fs time / ours", "requests"]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, r in result["sizes"].items():
        for case in CASES:
            c = r["cases"][case]
            ratio = r[f"{case.split()[1]}_ratio"]
            rows.append(
                [
                    f"{label} ({r['bytes'] / MB:.1f} MB)",
                    case,
                    f"{c['wall_seconds']:.3f}",
                    f"{c['cpu_seconds']:.3f}",
                    f"{c['mb_per_second']:.0f}",
                    f"{ratio:.2f}" if case.startswith("ours") else "",
                    str(r["requests"][case]),
                ]
            )
    return rows


BLOCKING_HEADERS = [
    "state",
    "blocked, ASYNC (local save) s",
    "upload s",
    "synchronous (save + upload) s",
    "blocked / synchronous",
    "upload CPU s (this process)",
]


def blocking_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            label,
            f"{r['blocked_seconds']:.3f}",
            f"{r['upload_seconds']:.3f}",
            f"{r['sync_seconds']:.3f}",
            f"{r['blocked_fraction']:.0%}",
            f"{r['upload_cpu_seconds']:.3f}",
        ]
        for label, r in result["sizes"].items()
    ]


def details_markdown(result: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md (for run_all's DETAILS)."""
    s = result["setup"]
    large, small = result["sizes"]["large"], result["sizes"]["small"]
    return "\n\n".join(
        [
            "S3 stand-in: moto's `ThreadedMotoServer` on 127.0.0.1 in a child process (in this one its Python request "
            "handling would compete for the GIL with s3fs's event loop but not with pyarrow's C++ client). States as "
            "`workloads.train.training_state` builds them (model, SGD with momentum buffers, RNG states): "
            f"large = {_what('large', large['bytes'])} (ResNet-50, 1000 classes: a real cell's checkpoint), "
            f"small = {_what('small', small['bytes'])} (the smoke sweep's model). **ours, save**: `tempfile.mkdtemp` "
            "+ `torch.save` into it (what `RaySession.report` does before `ray.train.report`), then "
            "`workloads.sessions.upload_checkpoint`, the function `RaySession._upload` calls (`create_dir` and "
            "`pyarrow.fs.copy_files` inside `with_retries`), to the `S3FileSystem` of `SweepStorage.ray_storage()`, "
            "then the local folder's removal. **s3fs, save**: "
            "`torch.save` to memory + `s3fs.pipe_file`. **ours, restore**: `RaySession._load` on a "
            "`ray.train.Checkpoint(path, filesystem=S3FileSystem)` (`as_directory()` download + `torch.load`). "
            "**s3fs, restore**: `cat_file` + `torch.load` of the same object. "
            f"{s['repeats']['large']} (large) and {s['repeats']['small']} (small) interleaved rounds after one "
            "warm-up; ratio = s3fs time / our time, median of per-round ratios of wall seconds; MB/s = 10^6 bytes "
            "/ median wall seconds; requests = what the server answered for one more call of each case.",
            markdown_table(TABLE_HEADERS, table_rows(result)),
            "With `CheckpointUploadMode.ASYNC` (what `RaySession.report` uses), `ray.train.report` passes the upload "
            "to Ray Train's single upload thread and returns after the ranks' barrier: a checkpoint blocks training "
            "for the local `torch.save` alone. A synchronous report would block for the save + upload:",
            markdown_table(BLOCKING_HEADERS, blocking_rows(result)),
            "Upload CPU s are this process's CPU seconds during the upload (pyarrow's threads; the server runs "
            "elsewhere): what the background upload takes from the training process's cores meanwhile. Both paths "
            "share the server, whose own time (it keeps objects in memory or a spooled temp file) is in both "
            "times, so the ratios lie closer to 1 than they would against a real S3 endpoint. The small state "
            "shows the per-request overhead: our save answers the requests of `create_dir` (a HEAD on the bucket "
            "and one directory-marker PUT per path level) and a multipart upload, where s3fs sends one PUT; our "
            "restore checks whether the path is a directory twice (a HEAD + a LIST each, Ray's `as_directory` and "
            "pyarrow's `copy_files`), lists it, and HEADs the file before its GET.",
        ]
    )


def print_result(result: dict[str, Any]) -> None:
    print(format_table(TABLE_HEADERS, table_rows(result)))
    print()
    print(format_table(BLOCKING_HEADERS, blocking_rows(result)))
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds for the ResNet-50 state")
    parser.add_argument("--small-repeats", type=int, default=15, help="rounds for the smoke model's state")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    result = run(args.repeats, args.small_repeats, args.threads)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
