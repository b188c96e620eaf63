"""The chart, the generated files and the image definition, without a cluster (helm only)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from libvirt_operator.api import meta
from localenv.controlplane import REPO_DIR, expected_bin_dir

CHART = REPO_DIR / "charts" / "libvirt-operator"
CONTAINERFILE = REPO_DIR / "Containerfile"
EMBEDDED_ENTRY = REPO_DIR / "images" / "lvo-embedded-libvirtd"


def helm_bin() -> Path:
    path = expected_bin_dir() / "helm"
    if not os.access(path, os.X_OK):
        pytest.fail(f"no helm at {path}: run hack/build-control-plane.sh", pytrace=False)
    return path


def helm(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data")}
    return subprocess.run([str(helm_bin()), *args], capture_output=True, text=True, env=env, timeout=60)


def render(tmp: Path, *sets: str) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)]
    done = helm("template", "lvo", str(CHART), "-n", "lvo-system", "--kube-version", "v1.32.0", *args, tmp=tmp)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


FULL_VALUES = ["agent.libvirt.mode=embedded", "metrics.serviceMonitor.enabled=true",
               "controller.watchNamespaces={vms-*,prod}", "agent.storageRoots={/srv/vm,/var/lib/libvirt/images}",
               "agent.tolerations[0].operator=Exists", "imagePullSecrets[0].name=regcred"]


@pytest.mark.parametrize("sets", [[], FULL_VALUES], ids=["defaults", "all-features"])
def test_helm_lint_is_clean(tmp_path, sets):
    done = helm("lint", "--strict", str(CHART), *[a for s in sets for a in ("--set", s)], tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize(("bad", "complaint"), [
    ("agent.libvirt.mode=vmware", "value must be one of 'socket', 'embedded'"),
    ("agent.storageRoots={images}", "does not match pattern '^/'"),
    ("metrics.port=0", "minimum"),
    ("controller.replicas=2", "additional properties 'replicas' not allowed"),
])
def test_values_schema_refuses_bad_values(tmp_path, bad, complaint):
    done = helm("template", "lvo", str(CHART), "--kube-version", "v1.32.0", "--set", bad, tmp=tmp_path)
    assert done.returncode != 0
    assert complaint in done.stderr, done.stderr


def test_chart_crds_are_the_generated_crds():
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    source = {p.name: p.read_bytes() for p in (REPO_DIR / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert chart == source, "charts/libvirt-operator/crds differs from crds/: run python hack/gen_manifests.py"


def test_manifests_are_current():
    done = subprocess.run([sys.executable, str(REPO_DIR / "hack" / "gen_manifests.py"), "--check"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HELM": str(helm_bin())})
    assert done.returncode == 0, done.stderr[-4000:]
    text = (REPO_DIR / "manifests" / "libvirt-operator.yaml").read_text()
    kinds = re.findall(r"^kind: (\w+)$", text, re.M)
    assert kinds[0] == "Namespace" and kinds.count("CustomResourceDefinition") == len(list((REPO_DIR / "crds").glob(
        "*.yaml")))


def test_chart_speaks_the_operators_names(tmp_path):
    """Labels, lease names and environment variables the chart hardcodes are the operator's."""
    docs = render(tmp_path)
    vm_policy = one(docs, "ValidatingAdmissionPolicy", "-vms")
    variables = " ".join(v["expression"] for v in vm_policy["spec"]["variables"])
    assert f"'{meta.NODE_LABEL}'" in variables
    lease_policy = one(docs, "ValidatingAdmissionPolicy", "-leases")
    assert any(f"'{meta.AGENT_LEASE_PREFIX}'" in v["expression"] for v in lease_policy["spec"]["validations"])

    ds = one(docs, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == {meta.LIBVIRT_NODE_LABEL: "true"}
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in agent["env"]} == {"NODE_NAME", "LIBVIRT_URI", "LVO_NAMESPACE", "LVO_STORAGE_ROOTS",
                                                 "LVO_CONSOLE_LOG_DIR", "LVO_METRICS_PORT", "LVO_HEALTH_PORT",
                                                 "LVO_MIGRATION_URI"}
    controller = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    scripts = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["scripts"]
    for container in (agent, controller):
        assert container["args"][0] in scripts, f"{container['args']} is no console script of the package"
        assert next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"] == 8080
        assert {"name": "LVO_METRICS_PORT", "value": "8080"} in container["env"]
        # Probes on the health endpoints the component serves (libvirt_operator.metrics.health).
        health_port = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
        assert {"name": "LVO_HEALTH_PORT", "value": str(health_port)} in container["env"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}


def test_agent_mounts_follow_the_libvirt_mode(tmp_path):
    roots = ["/srv/vm", "/var/lib/libvirt/images"]
    for mode in ("socket", "embedded"):
        spec = one(render(tmp_path, f"agent.libvirt.mode={mode}", "agent.storageRoots={" + ",".join(roots) + "}"),
                   "DaemonSet")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        agent = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
        assert {"name": "LVO_STORAGE_ROOTS", "value": ":".join(roots)} in agent["env"]
        for root in roots:  # host paths appear at the same path in the agent
            assert volumes[mounts[root]]["hostPath"]["path"] == root
        run = volumes[mounts["/run/libvirt"]]
        if mode == "socket":
            assert run["hostPath"] == {"path": "/run/libvirt", "type": "Directory"}
            assert "initContainers" not in spec
            assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        else:
            assert "emptyDir" in run
            (sidecar,) = spec["initContainers"]
            assert sidecar["restartPolicy"] == "Always" and sidecar["securityContext"]["privileged"]
            assert sidecar["args"] == [f"{EMBEDDED_ENTRY.name}"]
            side_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
            assert side_mounts["/run/libvirt"] == mounts["/run/libvirt"]
            assert all(side_mounts[root] == mounts[root] for root in roots)
            assert "limits" not in sidecar.get("resources", {}), "QEMU memory would count against a limit"


def test_admission_policy_can_be_disabled(tmp_path):
    kinds = {d["kind"] for d in render(tmp_path, "admissionPolicy.enabled=false")}
    assert "ValidatingAdmissionPolicy" not in kinds and "ValidatingAdmissionPolicyBinding" not in kinds
    monitors = [d for d in render(tmp_path, "metrics.serviceMonitor.enabled=true") if d["kind"] == "ServiceMonitor"]
    assert sorted(m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for m in monitors) == [
        "agent", "controller"]
    assert all(m["spec"]["endpoints"][0]["port"] == "metrics" for m in monitors)


def test_image_definition_is_consistent():
    """The Containerfile copies what exists and ships what the chart runs (it cannot be built here)."""
    text = CONTAINERFILE.read_text()
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:12", text, re.M)
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO_DIR / path).exists(), f"Containerfile copies missing {path}"
    assert f"COPY images/{EMBEDDED_ENTRY.name} /usr/local/bin/{EMBEDDED_ENTRY.name}" in text
    assert os.access(EMBEDDED_ENTRY, os.X_OK)
    assert subprocess.run(["bash", "-n", str(EMBEDDED_ENTRY)], capture_output=True).returncode == 0
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "-s", "--"\]$', text, re.M)
    for package in ("tini", "libvirt0", "libvirt-daemon-driver-qemu", "python3"):
        assert re.search(rf"\s{re.escape(package)}\s", text), f"runtime image lacks {package}"
    ignore = (REPO_DIR / "Containerfile.dockerignore").read_text().split()
    for path in ("pyproject.toml", "README.md", "operator/", "images/"):
        assert f"!{path}" in ignore
