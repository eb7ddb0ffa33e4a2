"""infra/ checked against the real schemas: KubeRay kinds against the CRDs' openAPIV3Schema (../shared/kuberay-crds,
read in place), Kubernetes built-in kinds with kubernetes-validate (its schemas ship in the package: offline), the
cluster launcher with Ray's own config validation (ray/autoscaler/ray-schema.json and its checks); and every
entrypoint, config, file and image named there exists in the repository or is a parameter."""

from __future__ import annotations

import copy
import functools
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support import SHARED, missing

REPO = pathlib.Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CRDS = SHARED / "kuberay-crds"
IMAGE_PARAMETER = "<registry>/dit4sr-catalog:<tag>"
MANIFESTS = sorted(path.name for path in INFRA.glob("*.yaml") if path.name != "cluster-launcher.yaml")


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc]


def all_documents() -> list[dict]:
    return [doc for name in MANIFESTS for doc in documents(name)]


def kuberay(kind: str) -> dict:
    (doc,) = [doc for doc in all_documents() if doc["kind"] == kind]
    return doc


def _closed(schema):
    """The API server prunes fields a structural schema does not declare, so a misspelt field would vanish
    silently on a cluster; here every object that lists its properties accepts only those."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _closed(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crds() -> dict[str, dict]:
    """KubeRay's CRDs by kind (a megabyte of YAML each: libyaml's loader)."""
    if not CRDS.is_dir():
        missing(f"KubeRay CRDs at {CRDS}")
    loaded = [yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
              for path in sorted(CRDS.glob("*.yaml"))]
    return {crd["spec"]["names"]["kind"]: crd for crd in loaded}


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    (version,) = [v for v in crds()[kind]["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1"
    assert set(doc["metadata"]) <= {"name", "generateName", "namespace", "labels", "annotations"}
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in crd_validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob", "RayCluster"])
def test_kuberay_manifests_match_the_crds(kind):
    assert crd_errors(kuberay(kind)) == []


def test_a_misspelt_or_misplaced_kuberay_field_is_caught():
    job = kuberay("RayJob")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["shutdownAfterJobFinish"] = True
    misplaced = copy.deepcopy(job)
    container = misplaced["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["limits"] = container.pop("resources")["limits"]  # one level too high
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["backoffLimit"] = "two"
    for broken in (misspelt, misplaced, wrong_type):
        assert crd_errors(broken)


def test_the_rayjob_is_what_its_scheduled_variants_run():
    job = kuberay("RayJob")
    spec = job["spec"]
    assert kuberay("RayCronJob")["spec"]["jobTemplate"] == spec  # the alpha RayCronJob runs this spec unchanged
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] < 24 * 3600
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    comments = (INFRA / "kuberay-raycronjob.yaml").read_text()
    assert "ALPHA" in comments and "--feature-gates=RayCronJob=true" in comments and "OFF by default" in comments


def test_runtime_envs_are_valid_ray_runtime_envs():
    from ray.runtime_env import RuntimeEnv

    for doc in (kuberay("RayJob"), kuberay("RayCronJob")):
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
        assert not any(re.search("KEY|SECRET|TOKEN|PASSWORD", name) for name in env.get("env_vars", {}))


def test_kubernetes_built_in_kinds_are_valid():
    version = kubernetes_validate.latest_version()
    built_in = [doc for doc in all_documents() if not doc["apiVersion"].startswith("ray.io/")]
    assert {doc["kind"] for doc in built_in} == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    for doc in built_in:
        kubernetes_validate.validate(doc, version, strict=True)
    cron = next(doc for doc in built_in if doc["kind"] == "CronJob")
    cron["spec"]["concurrencyPolcy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, version, strict=True)


def test_the_cronjob_waits_for_one_rayjob_at_a_time_with_the_rights_it_needs():
    docs = {doc["kind"]: doc for doc in documents("cronjob-rayjob.yaml")}
    cron = docs["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding = docs["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert docs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    # the ConfigMap the comment tells operators to create holds what the pod mounts and runs
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    made = re.search(r"kubectl create configmap (\S+) --from-file=(\S+)=(\S+) \\\n#\s+--from-file=(\S+)=(\S+)",
                     (INFRA / "cronjob-rayjob.yaml").read_text())
    assert made and volume["configMap"]["name"] == made[1]
    files = {made[2]: made[3], made[4]: made[5]}
    assert files == {"rayjob.yaml": "infra/kuberay-rayjob.yaml", "run-rayjob.sh": "infra/run-rayjob.sh"}
    assert container["command"] == ["sh", f"{mount['mountPath']}/run-rayjob.sh"]
    assert {"name": "RAYJOB_TEMPLATE", "value": f"{mount['mountPath']}/rayjob.yaml"} in container["env"]
    assert "generateName" in kuberay("RayJob")["metadata"]  # created anew each night


@pytest.mark.parametrize(("states", "code"), [
    (["", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"], 0),
    (["Running/RUNNING", "Retrying/FAILED", "Failed/FAILED"], 1),
    (["Running/RUNNING", "Complete/FAILED"], 1),
])
def test_the_cronjob_script_follows_the_rayjob_to_its_end(tmp_path, states, code):
    """run-rayjob.sh against a stand-in kubectl that answers like the API server would (no cluster here)."""
    (tmp_path / "states").write_text("".join(f"{state}\n" for state in states))
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        'case "$1" in\n'
        "  create) echo upscale-catalog-x7k2p ;;\n"
        f"  get) head -n 1 {tmp_path}/states; sed -i 1d {tmp_path}/states ;;\n"
        "esac\n")
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "POLL_SECONDS": "0",
           "RAYJOB_TEMPLATE": str(INFRA / "kuberay-rayjob.yaml")}
    result = subprocess.run(["sh", str(INFRA / "run-rayjob.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"create -f {INFRA / 'kuberay-rayjob.yaml'} -o jsonpath={{.metadata.name}}"
    assert calls[1:] == ["get rayjob upscale-catalog-x7k2p -o jsonpath="
                         "{.status.jobDeploymentStatus}/{.status.jobStatus}"] * len(states)


def test_the_cluster_launcher_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # ray-schema.json and Ray's further checks
    assert config["provider"]["type"] == "aws" and config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 1 and workers["min_workers"] < workers["max_workers"]
    broken = copy.deepcopy(config)
    broken["docker"]["worker_run_option"] = ["--gpus all"]
    with pytest.raises(Exception, match="worker_run_option"):
        validate_config(prepare_config(broken))


def _dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def _entrypoints() -> list[str]:
    return [doc["spec"].get("entrypoint") or doc["spec"]["jobTemplate"]["entrypoint"]
            for doc in all_documents() if doc["kind"] in ("RayJob", "RayCronJob")]


def _job_command(entrypoint: str) -> list[str]:
    """The catalog job's command inside the entrypoint's `sh -c '<job>; <exit code mapping>'`."""
    shell, flag, script = shlex.split(entrypoint)
    assert (shell, flag) == ("sh", "-c")
    return shlex.split(script.split(";", 1)[0])


@pytest.mark.parametrize(("job_exit", "ray_job_exit"), [(0, 0), (1, 1), (3, 0), (4, 0), (137, 137)])
def test_a_rayjob_retries_only_job_failures(tmp_path, job_exit, ray_job_exit):
    """The RayJob's backoffLimit retries a failed Ray job on a new cluster: only a job failure (1, or a kill) may
    fail it; 3 (inputs failed: they would fail again) and 4 (the lock is held) end it as succeeded. The
    entrypoint runs as written, with a stand-in `python` that exits as the job would."""
    (tmp_path / "python").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\nexit {job_exit}\n")
    (tmp_path / "python").chmod(0o755)
    for entrypoint in _entrypoints():
        result = subprocess.run(["sh", "-c", entrypoint], env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == ray_job_exit, result.stdout + result.stderr
        assert (tmp_path / "args").read_text().split() == _job_command(entrypoint)[1:]
        assert ("is not retried" in result.stdout) == (job_exit in (3, 4))


def test_every_service_account_the_pods_run_as_is_created_and_applied_first():
    named = set()
    for doc in all_documents():
        if doc["kind"].startswith("Ray"):
            spec = doc["spec"].get("jobTemplate", doc["spec"])
            cluster = spec.get("rayClusterSpec", spec)
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                named.add(group["template"]["spec"]["serviceAccountName"])
    created = {doc["metadata"]["name"] for doc in all_documents() if doc["kind"] == "ServiceAccount"}
    assert named == {"dit4sr-catalog"} and named <= created
    (account,) = documents("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "dit4sr-catalog"
    readme = (REPO / "README.md").read_text()
    first_apply = readme.index("kubectl apply -f infra/serviceaccount.yaml")
    assert first_apply < readme.index("kubectl create configmap") < readme.index("kubectl create -f infra/kuberay-")


def test_heads_read_the_buckets_and_every_ray_container_serves_metrics():
    """The submitted driver runs on the head: it needs the credentials Secret like the workers, and Prometheus
    scrapes ray_dit4sr_* on every node's metrics port."""
    for doc in all_documents():
        if not doc["kind"].startswith("Ray"):
            continue
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        cluster = spec.get("rayClusterSpec", spec)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "dit4sr-catalog-credentials", "optional": True}} in container["envFrom"]
            assert {"containerPort": 8080, "name": "metrics"} in container["ports"], (doc["kind"], container["name"])


def test_the_image_is_installed_not_editable_and_nothing_reports_usage_statistics():
    assert not re.search(r"pip install[^\n]* -e ", _dockerfile())
    assert re.search(r"^ENV .*RAY_USAGE_STATS_ENABLED=0", _dockerfile(), re.M)
    launcher = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    starts = [command for key in ("head_start_ray_commands", "worker_start_ray_commands") for command in launcher[key]
              if command.startswith("ray start")]
    assert len(starts) == 2 and all("--disable-usage-stats" in command for command in starts)


def test_the_readmes_image_step_names_the_image_in_every_manifest(tmp_path):
    """The README's build/push step and its substitution, run on a copy of infra/: every manifest then names the
    pushed image and still matches the CRDs and the Kubernetes API."""
    readme = (REPO / "README.md").read_text()
    assert re.search(r'^docker build -f infra/Dockerfile -t "\$IMAGE" \. && docker push "\$IMAGE"$', readme, re.M)
    (substitute,) = [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith("sed -i ")]
    shutil.copytree(INFRA, tmp_path / "infra")
    image = "registry.example.com/team/dit4sr-catalog:1a2b3c4"
    subprocess.run(["bash", "-c", substitute], cwd=tmp_path, env={"IMAGE": image, "PATH": "/usr/bin:/bin"},
                   check=True, timeout=60)
    docs = [doc for path in sorted((tmp_path / "infra").glob("*.yaml")) if path.name != "cluster-launcher.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert IMAGE_PARAMETER not in "".join(path.read_text() for path in (tmp_path / "infra").glob("*.yaml"))
    ours = {value for value in _images(docs) if "dit4sr-catalog" in value}
    assert ours == {image}
    version = kubernetes_validate.latest_version()
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            assert crd_errors(doc) == []
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_entrypoints_configs_and_files_named_in_infra_exist():
    workdir = re.search(r"^WORKDIR (\S+)$", _dockerfile(), re.M)[1]
    from pipeline.config import load_config

    for entrypoint in _entrypoints():
        python, script, flag, config = _job_command(entrypoint)
        assert (python, flag) == ("python", "--config")
        for path in (script, config):
            assert path.startswith(workdir + "/"), f"{path} is not under the image's WORKDIR {workdir}"
            assert (REPO / path[len(workdir) + 1:]).is_file(), path
        load_config(REPO / config[len(workdir) + 1:])
    text = "\n".join(path.read_text() for path in INFRA.iterdir() if path.is_file())
    named = set(re.findall(r"(?<![\w/.-])((?:jobs|configs|infra)/[\w./-]+\.(?:py|yaml|sh))", text))
    assert {"jobs/upscale_catalog.py", "configs/s3_catalog.yaml", "infra/kuberay-rayjob.yaml"} <= named
    assert [path for path in named if not (REPO / path).is_file()] == []
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", _dockerfile(), re.M)
    assert [source for line in copied for source in line.split() if not (REPO / source).exists()] == []
    # every package pyproject.toml installs is in the image
    include = re.search(r"^include = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)[1]
    packages = re.findall(r'"(\w+)\*"', include)
    assert {"dit4sr", "media", "pipeline"} <= set(packages) <= {source for line in copied for source in line.split()}


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [value for key, value in node.items() if key in ("image", "head_image", "worker_image")] + \
            [image for value in node.values() for image in _images(value)]
    if isinstance(node, list):
        return [image for value in node for image in _images(value)]
    return []


def test_images_are_the_projects_parameter_or_pinned_and_ray_versions_agree():
    launcher = yaml.safe_load((INFRA / "cluster-launcher.yaml").read_text())
    base = re.search(r"^FROM (\S+)$", _dockerfile(), re.M)[1]
    images = set(_images(all_documents()) + _images(launcher)) | {base}
    for image in images - {IMAGE_PARAMETER}:
        name, _, tag = image.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", f"{image} is not pinned"
    assert IMAGE_PARAMETER in images and "<registry>" in (INFRA / "README.md").read_text()
    ray_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-", base)[1]
    assert f'"ray[default,data,train]=={ray_version}"' in _dockerfile()
    versions = {doc["spec"].get("rayClusterSpec", doc["spec"].get("jobTemplate", {}).get("rayClusterSpec", doc["spec"]))
                ["rayVersion"] for doc in all_documents() if doc["kind"].startswith("Ray")}
    assert versions == {ray_version}
    torch = re.findall(r'"torch==([\d.]+)"', _dockerfile())
    assert len(torch) == 2 and len(set(torch)) == 1
