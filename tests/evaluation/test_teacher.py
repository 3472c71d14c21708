"""Teacher files: this project's folders, bare torchvision-layout state dicts, s3://, and clear refusals."""

import io
import json

import boto3
import pytest
import torch

from d3hr_ray.evaluation.teacher import TeacherError, load_teacher, save_teacher
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training.students import build_student
from tests.conftest import S3_TEST_ENV


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_round_trip(tmp_path):
    net = build_student("conv3", 4, 16)
    save_teacher(
        OutputDir(str(tmp_path / "t")),
        net,
        {
            "arch": "conv3",
            "num_classes": 4,
            "resolution": 16,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "class_names": list("abcd"),
        },
    )
    loaded, meta = load_teacher(str(tmp_path / "t"))
    assert _same(loaded, net) and meta["class_names"] == list("abcd") and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bare_state_dict_with_ddp_prefix_and_wrapper(tmp_path):
    net = build_student("resnet18", 5, 32)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded, meta = load_teacher(str(path), arch="resnet18", num_classes=5, resolution=32)
    assert _same(loaded, net) and meta["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(TeacherError, match="--teacher-arch"):
        load_teacher(str(path))
    with pytest.raises(TeacherError, match="do not fit resnet50"):
        load_teacher(str(path), arch="resnet50", num_classes=5)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="not a torch state dict"):
        load_teacher(str(tmp_path / "junk.pth"), arch="resnet18", num_classes=5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="without teacher.json"):
        load_teacher(str(tmp_path / "empty"))


def test_teacher_from_s3(s3_server, monkeypatch):
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="teachers")
    net = build_student("conv3", 3, 16)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    s3.put_object(Bucket="teachers", Key="bare/conv3.pt", Body=buf.getvalue())
    loaded, _ = load_teacher("s3://teachers/bare/conv3.pt", arch="conv3", num_classes=3, resolution=16)
    assert _same(loaded, net)
    save_teacher(
        OutputDir("s3://teachers/folder"),
        net,
        {"arch": "conv3", "num_classes": 3, "resolution": 16, "mean": [0] * 3, "std": [1] * 3},
    )
    loaded, meta = load_teacher("s3://teachers/folder")
    assert _same(loaded, net) and meta["resolution"] == 16
    assert json.loads(s3.get_object(Bucket="teachers", Key="folder/teacher.json")["Body"].read())["arch"] == "conv3"


def test_a_torchvision_teacher_reads_torch_hubs_cache_under_torch_home(tmp_path, monkeypatch):
    """The file torchvision's weights API would download, placed by hand where torch.hub keeps it: loaded from there
    with the weights' classes, crop and normalisation; nothing is downloaded (the fetch is made to fail)."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    from d3hr_ray.evaluation.teacher import teacher_meta, torchvision_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", _no_network)
    placed = torchvision.models.resnet18(weights=None)  # random weights, saved under the expected file name
    path = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert torchvision_checkpoint(ResNet18_Weights.IMAGENET1K_V1) == str(path)
    path.parent.mkdir(parents=True)
    torch.save(placed.state_dict(), path)
    model, meta = load_teacher("torchvision:resnet18:IMAGENET1K_V1")
    assert _same(model, placed)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 1000 and meta["class_names"] == categories
    assert (meta["resolution"], meta["mean"], meta["std"]) == (224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert teacher_meta("torchvision:resnet18")["weights"] == "ResNet18_Weights.IMAGENET1K_V1"  # the DEFAULT


def _no_network(self, *args, **kwargs):
    raise OSError("offline (the test forbids downloads)")


def test_a_missing_torchvision_file_is_one_line_naming_it_and_where_to_put_it(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", _no_network)
    with pytest.raises(TeacherError) as e:
        load_teacher("torchvision:resnet18:IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{tmp_path}/empty/hub/checkpoints/resnet18-f37072fd.pth is missing" in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    with pytest.raises(TeacherError, match="weights are IMAGENET1K_V1"):
        load_teacher("torchvision:resnet18:IMAGENET22K")
    with pytest.raises(TeacherError, match="the model must be one of resnet18, "):
        load_teacher("torchvision:alexnet")


def test_a_folder_teacher_loads_without_torchvisions_model_registry(tmp_path):
    """The teacher-feature actors (evaluation/driver.py) and evaluate's driver load a folder teacher; torchvision's
    model registry (it imports torch._dynamo, about 2 s of CPU a process) is imported for torchvision: teachers
    only. In a fresh process, as an actor starts."""
    import subprocess
    import sys

    torch.manual_seed(0)
    meta = {"arch": "conv3", "num_classes": 2, "resolution": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    save_teacher(OutputDir(str(tmp_path / "t")), build_student("conv3", 2, 16), meta)
    code = (
        "import sys\n"
        "import d3hr_ray.evaluation.driver\n"
        "from d3hr_ray.evaluation.teacher import load_teacher, torchvision_weights\n"
        f"load_teacher({str(tmp_path / 't')!r})\n"
        "print('torchvision.models' in sys.modules)\n"
        "torchvision_weights('torchvision:resnet18')\n"
        "print('torchvision.models' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
