"""The distill job survives what spot clusters do to it: a SIGKILLed driver, bad input, and keeps secrets out of logs.

One local Ray instance for the module; each job the test kills runs in its own process group (as `ray job submit`
would run it) and joins that instance through RAY_ADDRESS, so the test can SIGKILL the whole job.
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from d3hr_ray import build_pipeline
from d3hr_ray.artifacts.outputs import class_folder
from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import run
from d3hr_ray.flags import config_from_args
from tests.artifacts.test_report_html import HOSTILE, check_report
from tests.conftest import S3_TEST_ENV, BackgroundJob

# Small enough for 2 cores, long enough to be killed in the middle: 3 classes of digits' test split (133 images)
# in 14 shards. (The whole digits set's 537 images in shards of 40 gave the same shard count for 4x the work.)
FLAGS = [
    "--data",
    "digits:test",
    "--classes",
    "0,1,2",
    "--steps",
    "10",
    "--inversion-step",
    "3",
    "--shard-size",
    "10",
    "--batch-size",
    "10",
    "--ipc",
    "4",
    "--candidates",
    "100000",
    "--max-actors",
    "1",
    "--encode",
    "sample",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def ray_env(ray_local):
    return dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)


def kill_when(job: BackgroundJob, folder: Path, minimum: int, timeout: float = 1200) -> None:
    """SIGKILL the job's whole process group as soon as `folder` holds `minimum` finished state files.

    The job is killed on every way out (BackgroundJob's context), a failed assertion included. The
    timeout only bounds a hung job: a 2-core machine at load 18 took over 6 minutes to reach the first
    class file.
    """
    deadline = time.time() + timeout
    with job:
        while len(list(folder.glob("*.safetensors"))) < minimum:
            assert job.running(), f"the job ended before it could be killed:\n{job.tail()}"
            assert time.time() < deadline, f"no state file appeared in {folder} within {timeout:.0f} s:\n{job.tail()}"
            time.sleep(0.02)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): a file rewritten by a later run gets a new inode (atomic rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")}


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    manifest = run(config_from_args(DistillConfig, [*FLAGS, "--output", str(out)])).manifest
    assert manifest["resume"] == {
        "resumed": False,
        "shards": {"total": 14, "reused": 0, "computed": 14},
        "classes": {"total": 3, "reused": 0, "computed": 3},
    }
    return manifest, out


def test_killed_mid_statistics_and_mid_generation_resumes_to_identical_outputs(reference, ray_env, tmp_path, capsys):
    """Two job processes SIGKILLed (mid-statistics, then mid-generation), then the same command to the end. The
    last run is this process's `main` (its flags, its printout, its exit code): it knows the killed runs only from
    their files, as a fresh process would, and reuses the Ray workers the module's other runs warmed (a third job
    process cost the module about 15 s)."""
    from d3hr_ray.distill import main

    ref_manifest, ref = reference
    out = tmp_path / "out"
    shards_total = ref_manifest["resume"]["shards"]["total"]
    assert shards_total == 14

    kill_when(
        BackgroundJob([*FLAGS, "--output", str(out)], ray_env, tmp_path / "run1.log"), out / "_state" / "blocks", 1
    )
    after_first = files_of(out / "_state" / "blocks")
    block = json.loads((out / "_state" / "run.json").read_text())["block"]
    blocks_total = -(-shards_total // block)
    assert block == 2 and blocks_total == 7  # blocks.block_size: 133 images, 3 classes: 12 images a block at least
    assert 1 <= len(after_first) < blocks_total, "the first kill must land mid-statistics"
    assert not (out / "stats.safetensors").exists() and not (out / "manifest.json").exists()

    kill_when(
        BackgroundJob([*FLAGS, "--output", str(out)], ray_env, tmp_path / "run2.log"), out / "_state" / "classes", 1
    )
    after_second = files_of(out / "_state" / "classes")
    assert 1 <= len(after_second) < 3, "the second kill must land mid-generation"
    assert len(files_of(out / "_state" / "blocks")) == blocks_total

    capsys.readouterr()
    assert main([*FLAGS, "--output", str(out)]) == 0
    assert "resumed: reused 14 of 14 shards" in capsys.readouterr().out

    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["resume"]["shards"] == {"total": 14, "reused": 14, "computed": 0}
    assert m["resume"]["classes"] == {"total": 3, "reused": len(after_second), "computed": 3 - len(after_second)}
    # Finished work was reused, not recomputed: the first run's block files and the second's class files are untouched.
    blocks_now, classes_now = files_of(out / "_state" / "blocks"), files_of(out / "_state" / "classes")
    assert all(blocks_now[k] == v for k, v in after_first.items())
    assert all(classes_now[k] == v for k, v in after_second.items())

    # Byte-identical to the uninterrupted run.
    for name in ("stats.safetensors", "latents.safetensors", "distilled.parquet", "grid.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    images = sorted(p.relative_to(ref) for p in (ref / "images").rglob("*.png"))
    assert len(images) == 12
    assert all((out / p).read_bytes() == (ref / p).read_bytes() for p in images)
    assert m["counts"] == ref_manifest["counts"]


def test_generation_groups_of_classes_resume_from_a_kill_mid_group_to_identical_outputs(reference, tmp_path):
    """--images-per-call 12 at IPC 4: the three classes in one call. On a CPU a class's images are the same bytes
    in any group (the reference took one class a call), and a run killed between the group's class files (their
    on-disk state is exactly this: each class file is written atomically, images first) finishes the group to
    the same bytes, keeping the class it had written."""
    ref_manifest, ref = reference
    out = tmp_path / "grouped"
    flags = [*FLAGS, "--from-stats", str(ref / "stats.safetensors"), "--images-per-call", "12", "--output", str(out)]
    run(config_from_args(DistillConfig, flags))
    assert json.loads((out / "_state" / "run.json").read_text())["generate"]["classes_per_call"] == 3
    images = sorted(p.relative_to(ref) for p in (ref / "images").rglob("*.png"))
    assert len(images) == 12 and all((out / p).read_bytes() == (ref / p).read_bytes() for p in images)
    for name in ("latents.safetensors", "distilled.parquet", "grid.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    # The kill: class 0 written, classes 1 and 2 and the final outputs not.
    classes = out / "_state" / "classes"
    for c in (1, 2):
        (classes / f"{c:06d}.safetensors").unlink()
    assert {p.parts[1] for p in images} == {class_folder(n) for n in ("0", "1", "2")}
    for p in images:
        if p.parts[1] != class_folder("0"):
            (out / p).unlink()
    for name in ("latents.safetensors", "distilled.parquet", "grid.png", "manifest.json", "report.html"):
        (out / name).unlink()
    kept = files_of(classes)
    assert list(kept) == ["000000.safetensors"]
    m = run(config_from_args(DistillConfig, flags)).manifest
    assert m["resume"]["classes"] == {"total": 3, "reused": 1, "computed": 2}
    assert files_of(classes)["000000.safetensors"] == kept["000000.safetensors"]  # not rewritten
    assert all((out / p).read_bytes() == (ref / p).read_bytes() for p in images)
    for name in ("latents.safetensors", "distilled.parquet", "grid.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    # Another group size is another distilled set: refused, naming the key.
    with pytest.raises(Exception, match="classes_per_call"):
        run(config_from_args(DistillConfig, [*flags[:-4], "--images-per-call", "8", "--output", str(out)]))


def test_a_rerun_with_other_settings_is_refused_naming_them_and_overwrite_starts_over(reference, ray_env, capsys):
    from d3hr_ray.distill import main

    _, ref = reference
    flags = [*FLAGS, "--output", str(ref)]
    flags[flags.index("--seed") + 1] = "8"
    flags[flags.index("--ipc") + 1] = "5"
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert "ipc, seed differ" in err and "--overwrite" in err
    assert main([*flags, "--stats-only"]) == 1  # the statistics keys alone differ too
    assert "seed differ" in capsys.readouterr().err
    # --overwrite deletes this job's files and computes every shard again (the reference is not used after this) ...
    again = run(config_from_args(DistillConfig, [*flags, "--stats-only", "--overwrite"])).manifest
    assert again["resume"] == {"resumed": False, "shards": {"total": 14, "reused": 0, "computed": 14}}
    assert not (ref / "latents.safetensors").exists() and not (ref / "_state" / "classes").exists()
    # ... and the full command after --stats-only continues with generation.
    full = run(config_from_args(DistillConfig, flags)).manifest
    assert full["status"] == "complete" and (ref / "latents.safetensors").exists()
    assert full["resume"] == {
        "resumed": True,
        "shards": {"total": 14, "reused": 14, "computed": 0},
        "classes": {"total": 3, "reused": 0, "computed": 3},
    }


# -- bad input, end to end ------------------------------------------------------------------------

AWKWARD = ["T-shirt/top", "..", HOSTILE, "ü ñ space"]  # HOSTILE starts with "." too


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, (7 * value) % 256)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def awkward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "dit"
    build_pipeline(num_classes=len(AWKWARD), class_names=AWKWARD, seed=5).save_pretrained(folder)
    return folder


def test_bad_parquet_rows_and_awkward_class_names(ray_local, awkward_model, tmp_path):
    """Null image, null bytes, garbage, null class, a class left with 1 usable image: counted, reported, the rest
    distilled."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images, classes = [], []
    for c, name in enumerate(AWKWARD[:3]):  # three good classes, 3 images each
        for i in range(3):
            images.append({"bytes": png(30 * c + i), "path": f"{c}-{i}.png"})
            classes.append(name)
    images += [
        {"bytes": png(200), "path": "u.png"},
        {"bytes": b"garbage", "path": "g.png"},  # 'ü ñ space': 1 usable of 2
        None,
        {"bytes": None, "path": "n.png"},
        {"bytes": png(5), "path": "nc.png"},
    ]
    classes += ["ü ñ space", "ü ñ space", "T-shirt/top", "..", None]
    pq.write_table(pa.table({"image": pa.array(images, image_type), "class": classes}), tmp_path / "bad.parquet")
    out = tmp_path / "out"
    from d3hr_ray.distill import main

    code = main(
        [
            "--data",
            str(tmp_path / "bad.parquet"),
            "--model",
            str(awkward_model),
            "--output",
            str(out),
            "--steps",
            "4",
            "--inversion-step",
            "1",
            "--ipc",
            "2",
            "--candidates",
            "100",
            "--encode",
            "mean",
            "--max-actors",
            "1",
        ]
    )
    assert code == 1  # the job finished what it could, then failed loudly
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "incomplete" and list(m["undistilled"]) == ["ü ñ space"]
    assert any("ü ñ space" in r for r in m["reasons"])
    assert m["class_names"] == AWKWARD[:3]
    assert m["counts"]["T-shirt/top"] == {"read": 4, "used": 3, "skipped": 1}
    assert m["counts"][".."] == {"read": 4, "used": 3, "skipped": 1}
    assert m["counts"]["ü ñ space"] == {"read": 2, "used": 1, "skipped": 1}
    reasons = sorted(s["reason"] for s in m["skipped"])
    assert reasons.count("no image data (null)") == 2 and "no class (null)" in reasons
    assert any(r.startswith(("not an image", "corrupt image")) for r in reasons)
    assert len(m["skipped"]) == 4
    from safetensors.torch import load_file

    assert load_file(out / "stats.safetensors")["count"].tolist() == [3, 3, 3, 1]  # kept, with every class's count
    table = pq.read_table(out / "distilled.parquet")
    assert table.column("class").to_pylist() == [n for n in AWKWARD[:3] for _ in range(2)]
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert folders == sorted(["T-shirt%2Ftop", "%2E.", class_folder(HOSTILE)])
    assert all(out.resolve() in p.resolve().parents for p in out.rglob("*"))
    # report.html, parsed: every class (the undistilled one with its reason), each image the Parquet row's bytes.
    page = check_report(out, {**{n: 2 for n in AWKWARD[:3]}, "ü ñ space": 0})
    assert "1 usable" in page.rows[3]["cells"][3] and [r["cells"][1] for r in page.rows] == ["3", "3", "3", "1"]
    by_path = {r["path"]: r["bytes"] for r in table.column("image").to_pylist()}
    shown = [p for r in page.rows for p in r["files"]]  # the images each thumbnail was checked against
    assert sorted(shown) == sorted(by_path) and all((out / p).read_bytes() == by_path[p] for p in shown)


def test_imagefolder_with_a_class_of_one_file_is_refused_before_any_work(ray_local, tmp_path):
    from d3hr_ray.distill import main

    root = tmp_path / "data"
    for name, n in (("a b", 3), ("ü", 1), ("c", 2)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png(i))
    model = tmp_path / "m"
    build_pipeline(num_classes=3, class_names=["a b", "ü", "c"], seed=1).save_pretrained(model)
    out = tmp_path / "out"
    assert main(["--data", str(root), "--model", str(model), "--output", str(out)]) == 1
    assert not out.exists()  # refused from the listing: no Ray work, no output folder


def test_s3_credentials_never_reach_logs_or_the_manifest(ray_local, s3_server, tmp_path):
    import boto3

    key_id, secret = "AKIAD3HRSECRETKEYID", "d3hr/Super+Secret/Value0123456789abcdefgh"
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID=key_id,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
    )
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id=key_id, aws_secret_access_key=secret, region_name="us-east-1"
    )
    s3.create_bucket(Bucket="secret-out")
    runs = [
        [
            "--classes",
            "0,1",
            "--steps",
            "4",
            "--inversion-step",
            "1",
            "--max-actors",
            "1",
            "--stats-only",
            "--output",
            "s3://secret-out/run",
        ],
        ["--data", "s3://no-such-bucket/data", "--model", "builtin:digits", "--output", "s3://secret-out/fail"],
        ["--classes", "0,1", "--steps", "4", "--inversion-step", "1", "--output", "s3://no-such-bucket/out"],
    ]
    # The three at once (the two failing ones stop before any Ray work): each pays Python's imports alone.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "d3hr_ray.distill", *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags in runs
    ]
    codes = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        codes.append(proc.returncode)
        for text in (stdout, stderr):
            assert secret not in text and key_id not in text
    assert codes[0] == 0 and codes[1] != 0 and codes[2] != 0
    manifest = s3.get_object(Bucket="secret-out", Key="run/manifest.json")["Body"].read().decode()
    assert secret not in manifest and key_id not in manifest
    state = s3.get_object(Bucket="secret-out", Key="run/_state/run.json")["Body"].read().decode()
    assert secret not in state and key_id not in state
