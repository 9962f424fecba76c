"""deploy/: the kustomizations render, every object validates offline against the Kubernetes
schemas (kubernetes-validate, strict), every flag passed to gradserve exists in
``gradserve serve --help``, and the Deployment keeps the promises the README makes of it.

Rendering uses ``kubectl kustomize`` (or ``kustomize build``) when one is installed; without
either, the base's files are validated as they are (they carry their own labels and selectors,
so they need no kustomize transformer to be valid) and the overlays are skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: Oldest Kubernetes with GA gRPC probes, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
VALIDATED = ("base", "overlays/gpu", "overlays/queue-time")


def _render_command(folder: Path) -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(folder)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(folder)]
    return None


def _objects(name: str) -> list[dict[str, Any]]:
    folder = K8S / name
    command = _render_command(folder)
    if command is not None:
        text = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
        return [d for d in yaml.safe_load_all(text) if d]
    if name != "base":
        pytest.skip("neither kubectl nor kustomize is installed: overlays cannot be rendered")
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [d for f in kustomization["resources"] for d in yaml.safe_load_all((folder / f).read_text()) if d]


def _serve_flags() -> set[str]:
    text = subprocess.run([sys.executable, "-m", "gradserve", "serve", "--help"], check=True,
                          capture_output=True, text=True, timeout=120).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return list(obj["spec"]["template"]["spec"]["containers"])
    if obj["kind"] == "ServingRuntime":
        return list(obj["spec"]["containers"])
    return []


@pytest.mark.parametrize("name", VALIDATED)
def test_every_object_validates_against_the_kubernetes_schemas(name: str) -> None:
    objects = _objects(name)
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget"}
    for obj in objects:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)   # raises ValidationError


@pytest.mark.parametrize("name", VALIDATED + ("kserve",))
def test_every_flag_passed_to_gradserve_exists(name: str) -> None:
    flags = _serve_flags()
    assert {"--model-dir", "--workers", "--grace-seconds", "--metrics-port"} <= flags   # the help was read
    passed = set().union(*(_flags(c.get("args", [])) for o in _objects(name) for c in _containers(o)))
    assert passed and passed <= flags, passed - flags


def test_deployment_drains_probes_and_runs_locked_down() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _objects("base")}
    pod = objects[("Deployment", "gradserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) for a in container["args"])
    grace, pre_stop = float(args["--grace-seconds"]), container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and pod["terminationGracePeriodSeconds"] > grace + float(pre_stop[1])
    port = int(args["--port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}   # the health service, no token needed
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    token_dir = str(Path(args["--auth-token-file"]).parent)
    assert volumes[mounts[token_dir]]["secret"]["secretName"] == "gradserve-tokens"
    selector = objects[("Deployment", "gradserve")]["spec"]["selector"]["matchLabels"]
    headless = objects[("Service", "gradserve-headless")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == selector
    assert objects[("Service", "gradserve")]["spec"]["selector"] == selector
    assert objects[("PodDisruptionBudget", "gradserve")]["spec"]["selector"]["matchLabels"] == selector


def test_gpu_overlay_asks_for_a_gpu_and_places_the_model_on_it() -> None:
    (deployment,) = [o for o in _objects("overlays/gpu") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device=/GPU:0" in container["args"]


def test_kserve_example_names_its_runtime() -> None:
    objects = {o["kind"]: o for o in _objects("kserve")}
    runtime, service = objects["ServingRuntime"], objects["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"])
    assert args["--model-dir"] == "/mnt/models"   # where KServe's storage initializer puts storageUri
    assert {p["containerPort"] for p in container["ports"] if p["name"] == "h2c"} == {int(args["--port"])}


def test_dockerfile_wraps_install_sh() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^RUN sh /tmp/build/install\.sh ", text, re.MULTILINE)
    user = re.search(r"^USER (\d+)", text, re.MULTILINE)
    assert user and int(user.group(1)) != 0
    assert re.search(r'^HEALTHCHECK .*CMD \["gradserve-healthcheck"\]$', text, re.MULTILINE)
    assert "gradserve-healthcheck" in (ROOT / "deploy" / "install.sh").read_text()
    assert re.search(r'^ENTRYPOINT \["gradserve", "serve"\]$', text, re.MULTILINE)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert cmd is not None
    args = yaml.safe_load(cmd.group(1))
    assert args[:2] == ["--model-dir", "/models"] and _flags(args) <= _serve_flags()
    for source in re.search(r"^COPY (.*) /tmp/build/$", text, re.MULTILINE).group(1).split():   # type: ignore[union-attr]
        if not source.startswith("dist/"):
            assert (ROOT / source).is_file(), source
