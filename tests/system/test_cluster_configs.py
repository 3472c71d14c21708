"""Every cluster file and job config parses, and its keys are ones the consumer knows.

- cluster/aws-gpu-spot.yaml and cluster/fake-multinode.yaml against the Ray autoscaler's own JSON schema (shipped
  in the ray wheel; the second runs end to end in tests/system/test_autoscaler.py);
- cluster/kuberay/*.yaml against the fields of KubeRay's v1 CRDs (RayCluster, RayJob), written out
  below from the CRDs' openAPIV3Schema (ray-project/kuberay, ray-operator/config/crd/bases), with
  the checks that matter for a spot GPU cluster and a resumable job;
- the RayJob's entrypoint and every jobs/*.yaml through the job's own config parser;
- jobs/runtime-env.yaml against Ray's runtime-env fields.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from d3hr_ray.config import DistillConfig
from d3hr_ray.evaluate import EvaluateConfig
from d3hr_ray.flags import config_from_args

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

# KubeRay v1 field names and required fields (the CRDs' openAPIV3Schema), at the levels these files use.
_STRICT = {"type": "object", "additionalProperties": False}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                }
            },
        },
    },
}
_HEAD_GROUP = {
    **_STRICT,
    "required": ["template"],
    "properties": {
        k: {}
        for k in (
            "enableIngress",
            "headService",
            "ingressOptions",
            "labels",
            "rayStartParams",
            "resources",
            "serviceType",
        )
    }
    | {"template": _POD_TEMPLATE, "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_WORKER_GROUP = {
    **_STRICT,
    "required": ["groupName", "maxReplicas", "minReplicas", "template"],
    "properties": {
        k: {}
        for k in ("idleTimeoutSeconds", "labels", "numOfHosts", "priority", "resources", "scaleStrategy", "suspend")
    }
    | {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer"},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "template": _POD_TEMPLATE,
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_AUTOSCALER = {
    **_STRICT,
    "properties": {
        k: {}
        for k in (
            "args",
            "command",
            "env",
            "envFrom",
            "image",
            "imagePullPolicy",
            "resources",
            "securityContext",
            "version",
            "volumeMounts",
        )
    }
    | {"idleTimeoutSeconds": {"type": "integer"}, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}},
}
RAYCLUSTER_SPEC = {
    **_STRICT,
    "required": ["headGroupSpec"],
    "properties": {
        k: {}
        for k in (
            "authOptions",
            "gcsFaultToleranceOptions",
            "headServiceAnnotations",
            "historyServerOptions",
            "managedBy",
            "networkPolicy",
            "suspend",
            "tlsOptions",
            "upgradeStrategy",
        )
    }
    | {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER,
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}
RAYJOB_SPEC = {
    **_STRICT,
    "properties": {
        k: {}
        for k in (
            "activeDeadlineSeconds",
            "clusterSelector",
            "deletionStrategy",
            "entrypointNumCpus",
            "entrypointNumGpus",
            "entrypointResources",
            "jobId",
            "managedBy",
            "metadata",
            "preRunningDeadlineSeconds",
            "submitterConfig",
            "submitterPodTemplate",
            "suspend",
        )
    }
    | {
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "rayClusterSpec": RAYCLUSTER_SPEC,
    },
}


def _resource(kind: str, spec_schema: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec_schema,
        },
    }


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_cluster_file_is_checked_here():
    checked = {
        "aws-gpu-spot.yaml",
        "fake-multinode.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "Dockerfile",
    }
    assert {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()} == checked


def test_aws_launcher_config_matches_the_autoscaler_schema():
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    cfg = load(CLUSTER / "aws-gpu-spot.yaml")
    jsonschema.validate(cfg, schema)
    workers = cfg["available_node_types"]["gpu_spot"]
    assert workers["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no model actors on the head


def test_fake_multinode_config_matches_the_autoscaler_schema():
    """The config tests/system/test_autoscaler.py runs (its end-to-end check); here the schema and the keys that the
    fake provider and the test rely on."""
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    cfg = load(CLUSTER / "fake-multinode.yaml")
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "fake_multinode"
    assert cfg["head_node_type"] == "ray.head.default"  # the name the fake provider gives its head
    (worker,) = (t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"])
    assert worker["min_workers"] == 0 and worker["resources"]["model_slot"] == 1  # scales from zero, one actor a node
    assert "model_slot" not in cfg["available_node_types"][cfg["head_node_type"]]["resources"]  # no actor on the head


def _gpu_spot_group(spec: dict) -> dict:
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert any("spot" in k.lower() or "spot" in str(v).lower() for k, v in pod["nodeSelector"].items())
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]  # scales to zero when idle
    return group


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__  # the version this project is tested with
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no model actors
    _gpu_spot_group(spec)


def test_raycluster_matches_the_crd_and_is_an_autoscaling_spot_gpu_cluster():
    cfg = load(CLUSTER / "kuberay" / "raycluster.yaml")
    jsonschema.validate(cfg, _resource("RayCluster", RAYCLUSTER_SPEC))
    _check_cluster_spec(cfg["spec"])


def test_rayjob_matches_the_crd_and_resumes_on_a_new_cluster():
    cfg = load(CLUSTER / "kuberay" / "rayjob.yaml")
    jsonschema.validate(cfg, _resource("RayJob", RAYJOB_SPEC))
    spec = cfg["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    standalone = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    assert spec["rayClusterSpec"]["workerGroupSpecs"] == standalone["workerGroupSpecs"]  # one worker shape, two files
    assert (
        spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    )
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)
    # The entrypoint is a valid distill command whose state survives the cluster: s3:// output.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "d3hr_ray.distill"]
    cfg = config_from_args(DistillConfig, argv[3:])
    assert cfg.output.startswith("s3://") and cfg.data.startswith("s3://") and cfg.model.startswith("s3://")
    # The GPU group starts at 0 nodes: GPU actors asked for explicitly (auto would pick CPUs), and a pool that may
    # grow to every GPU the group can reach (without --max-actors it never passes the start count).
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus_per_node = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] == 0 and cfg.num_gpus == 1
    assert cfg.max_actors == group["maxReplicas"] * gpus_per_node


def test_dockerfile_ray_version_matches_the_kuberay_files():
    text = (CLUSTER / "Dockerfile").read_text()
    (tag,) = re.findall(r"^FROM rayproject/ray:(\S+)", text, flags=re.M)
    assert tag.split("-")[0] == ray.__version__
    assert "pip install" in text and "d3hr_ray" in text


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_parse(path):
    if path.name == "runtime-env.yaml":
        env = load(path)
        assert set(env) <= RuntimeEnv.known_fields
        assert {".venv/", "d3hr-output/", ".git/"} <= set(RuntimeEnv(**env)["excludes"])
        return
    if path.name.endswith("-eval.yaml"):  # evaluate's presets: checked below
        assert config_from_args(EvaluateConfig, ["--config", str(path)]).test
        return
    cfg = config_from_args(DistillConfig, ["--config", str(path)])  # unknown keys and bad values raise ConfigError
    assert cfg.data
    if cfg.num_gpus:  # a GPU job for the autoscaling clusters in cluster/: its pools may grow to the group's size
        group = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]["workerGroupSpecs"][0]
        assert cfg.max_actors == group["maxReplicas"]


def test_the_imagenet_evaluation_preset_is_the_papers_protocol():
    """jobs/imagenet1k-eval.yaml against D3HR.md's stage 6 for ImageNet-1K, written out here: ResNet-18 student
    and teacher (torchvision's ImageNet weights), 224 px, soft labels at T = 20 with CutMix Beta(1, 1) on every batch,
    RandomResizedCrop(0.08-1), AdamW lr 1e-3 (ResNets) with weight decay 0.01, 300 epochs, 5 repeats."""
    from d3hr_ray.evaluation.teacher import teacher_meta

    cfg = config_from_args(EvaluateConfig, ["--config", str(REPO / "jobs" / "imagenet1k-eval.yaml")])
    assert (cfg.student, cfg.teacher, cfg.resolution) == ("resnet18", "torchvision:resnet18:IMAGENET1K_V1", 224)
    assert (cfg.labels, cfg.temperature, cfg.cutmix_alpha, cfg.cutmix_p) == ("kd", 20.0, 1.0, 1.0)
    assert (tuple(cfg.crop_scale), cfg.lr, cfg.weight_decay, cfg.epochs, cfg.repeats) == (
        (0.08, 1.0),
        1e-3,
        0.01,
        300,
        5,
    )
    assert (
        cfg.distilled == load(REPO / "jobs" / "imagenet1k.yaml")["output"]
    )  # evaluates what the distill preset writes
    meta = teacher_meta(cfg.teacher)  # the weights' metadata; no file needed
    assert (meta["arch"], meta["num_classes"], meta["resolution"]) == ("resnet18", 1000, 224)
