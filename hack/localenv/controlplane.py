"""A real, local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager.

Everything lives under <world>/controlplane/ and listens on 127.0.0.1 only:
  pki/            CA, API server cert, client certs, service-account key (kept across restarts)
  etcd/           etcd data (kept across restarts)
  logs/<name>.log one log per process
  admin.kubeconfig, kube-controller-manager.kubeconfig
  state.json      ports, PIDs, bin dir of the last start The processes outlive the Python
process that started them; `ControlPlane.load(world)` picks them up again.
No scheduler and no kubelet: pods stay Pending, Node objects are registered by
hand (see kubenodes.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from localenv import procs

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO_DIR = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_DIR / "hack" / "build-control-plane.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
SERVICE_CIDR = "10.0.0.0/24"
KCM_CONTROLLERS = "namespace,garbagecollector,serviceaccount,serviceaccount-token"
ADMIN_USER = "lvo-admin"
START_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager")


# --- binaries -----------------------------------------------------------------------------------


def pinned_versions() -> dict[str, str]:
    """KEY=VALUE pairs of hack/versions.env (the single source of tool versions)."""
    pairs = {}
    for line in (REPO_DIR / "hack" / "versions.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            pairs[key.strip()] = value.strip()
    return pairs


def expected_bin_dir() -> Path:
    """Where build-control-plane.sh puts the binaries (same rule as hack/lib.sh)."""
    cache = os.environ.get("LIBVIRT_OPERATOR_CACHE")
    if not cache:
        cache = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "libvirt-operator")
    v = pinned_versions()
    name = f"k8s-{v['KUBERNETES_VERSION']}-etcd-{v['ETCD_VERSION']}-helm-{v['HELM_VERSION']}"
    return Path(cache) / "bin" / name


def build_binaries() -> Path:
    """Run the build script (about a second when cached); return its bin dir."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def require_binaries(bin_dir: Path) -> None:
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)} in {bin_dir}: run hack/build-control-plane.sh "
            "(or `python -m localenv up`) first"
        )


# --- PKI and kubeconfigs (openssl CLI, EC P-256 keys: fast to generate) --------------------------


def _openssl_cert(pki: Path, name: str, subject: dict[str, str], ext: dict[str, str]) -> None:
    """Create <name>.key + <name>.crt; self-signed CA if name == 'ca', else signed by the CA."""
    dn = "\n".join(f"{k} = {v}" for k, v in subject.items())
    exts = "\n".join(f"{k} = {v}" for k, v in ext.items())
    cnf = pki / f"{name}.cnf"
    cnf.write_text(f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n{dn}\n[ext]\n{exts}\n")
    argv = ["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-nodes", "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.crt")]
    argv += ["-config", str(cnf), "-extensions", "ext", "-days", "3650"]
    if name != "ca":
        argv += ["-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key")]
        argv += ["-set_serial", "0x" + secrets.token_hex(16)]
    subprocess.run(argv, check=True, capture_output=True)
    cnf.unlink()


def issue_client_cert(pki: Path, name: str, user: str, groups: tuple[str, ...] = ()) -> None:
    """<name>.crt/.key for `user` in `groups` (O= fields), signed by the world CA."""
    if (pki / f"{name}.crt").exists():
        return
    subject = {f"{i}.O": g for i, g in enumerate(groups)} | {"CN": user}
    ext = {
        "basicConstraints": "critical,CA:FALSE",
        "keyUsage": "critical,digitalSignature",
        "extendedKeyUsage": "clientAuth",
        "authorityKeyIdentifier": "keyid",
    }
    _openssl_cert(pki, name, subject, ext)


def ensure_pki(pki: Path) -> None:
    """CA, API server serving cert, service-account signing key (kept across restarts)."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        ca_ext = {
            "basicConstraints": "critical,CA:TRUE",
            "keyUsage": "critical,keyCertSign,cRLSign,digitalSignature",
            "subjectKeyIdentifier": "hash",
        }
        _openssl_cert(pki, "ca", {"CN": "libvirt-operator-local-ca"}, ca_ext)
    if not (pki / "apiserver.crt").exists():
        names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        sans = ["IP:127.0.0.1", "IP:10.0.0.1", "DNS:localhost"] + [f"DNS:{n}" for n in names]
        ext = {
            "basicConstraints": "critical,CA:FALSE",
            "keyUsage": "critical,digitalSignature",
            "extendedKeyUsage": "serverAuth",
            "subjectAltName": ",".join(sans),
            "authorityKeyIdentifier": "keyid",
        }
        _openssl_cert(pki, "apiserver", {"CN": "kube-apiserver"}, ext)
    if not (pki / "sa.key").exists():
        argv = ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        subprocess.run([*argv, "-out", str(pki / "sa.key")], check=True, capture_output=True)
    if not (pki / "sa.pub").exists():
        # kube-apiserver reads PKCS#8 EC keys only as public keys, hence a separate .pub.
        pub = ["openssl", "pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")]
        subprocess.run(pub, check=True, capture_output=True)
    issue_client_cert(pki, "admin", ADMIN_USER, ("system:masters",))
    issue_client_cert(pki, "kube-controller-manager", "system:kube-controller-manager")


def write_kubeconfig(path: Path, server: str, pki: Path, cert_name: str, user: str) -> None:
    """A self-contained kubeconfig (certificates embedded) for one client identity."""

    def data(file: str) -> str:
        return b64encode((pki / file).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": data("ca.crt")}}],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": data(f"{cert_name}.crt"),
                    "client-key-data": data(f"{cert_name}.key"),
                },
            }
        ],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- the control plane --------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager for one world directory."""

    def __init__(self, world_dir: Path | str, bin_dir: Path | str | None = None):
        self.world_dir = Path(world_dir)
        self.dir = self.world_dir / "controlplane"
        self.pki = self.dir / "pki"
        self.bin_dir = Path(bin_dir) if bin_dir else expected_bin_dir()
        self.ports: dict[str, int] = {}
        self.processes: dict[str, procs.ProcessRef] = {}
        self.startup_seconds: float | None = None

    # -- paths and identity

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def api_client(self) -> ApiClient:
        """A kubernetes.client.ApiClient with the admin (system:masters) identity."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # -- state across processes

    @classmethod
    def load(cls, world_dir: Path | str) -> ControlPlane:
        """The control plane recorded in <world>/controlplane/state.json (running or not)."""
        cp = cls(world_dir)
        state = json.loads(cp.state_file.read_text())
        cp.bin_dir = Path(state["bin_dir"])
        cp.ports = state["ports"]
        cp.processes = {n: procs.ProcessRef.from_dict(p) for n, p in state["processes"].items()}
        cp.startup_seconds = state.get("startup_seconds")
        return cp

    def _save(self) -> None:
        state = {
            "bin_dir": str(self.bin_dir),
            "server": self.server if "kube-apiserver" in self.ports else None,
            "ports": self.ports,
            "processes": {n: p.to_dict() for n, p in self.processes.items()},
            "startup_seconds": self.startup_seconds,
        }
        procs.write_json(self.state_file, state)

    def status(self) -> dict[str, bool]:
        """Process name -> running, for every process of the last start."""
        return {name: ref.running() for name, ref in self.processes.items()}

    def is_running(self) -> bool:
        status = self.status()
        return set(status) == set(START_ORDER) and all(status.values())

    # -- lifecycle

    def start(self, timeout: float = 90.0) -> ControlPlane:
        """Start all three processes and wait until the API is usable; returns self."""
        require_binaries(self.bin_dir)
        previous = self._previous_state()
        recorded = [procs.ProcessRef.from_dict(p) for p in previous.get("processes", {}).values()]
        if any(ref.running() for ref in recorded):
            raise RuntimeError(f"control plane in {self.dir} is already (partly) running; stop it first")
        self.dir.mkdir(parents=True, exist_ok=True)
        ensure_pki(self.pki)
        ports = previous.get("ports", {})
        for attempt in (1, 2, 3):
            began = time.monotonic()
            self.ports = {name: procs.free_port(ports.get(name)) for name in ("etcd", "etcd-peer", "kube-apiserver")}
            try:
                self._start_processes(timeout)
            except BaseException as err:
                self.stop()  # never leave half a control plane behind
                # A port seen free can be taken before our process binds it: retry with new ones.
                if not (isinstance(err, procs.StartupError) and "address already in use" in str(err)) or attempt == 3:
                    raise
                ports = {}
                continue
            self.startup_seconds = round(time.monotonic() - began, 2)
            self._save()
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _previous_state(self) -> dict:
        """The last recorded state: its ports are reused if free, so old kubeconfigs keep working."""
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _start_processes(self, timeout: float) -> None:
        self.processes = {}
        write_kubeconfig(self.kubeconfig, self.server, self.pki, "admin", ADMIN_USER)
        kcm_kubeconfig = self.dir / "kube-controller-manager.kubeconfig"
        write_kubeconfig(kcm_kubeconfig, self.server, self.pki, "kube-controller-manager", "kcm")

        etcd = self._launch("etcd", self._etcd_args())
        procs.wait_until(self._etcd_healthy, "etcd /health", timeout, [etcd])
        apiserver = self._launch("kube-apiserver", self._apiserver_args())
        procs.wait_until(lambda: self._get("/readyz") == 200, "kube-apiserver /readyz", timeout, [etcd, apiserver])
        kcm = self._launch("kube-controller-manager", self._kcm_args(kcm_kubeconfig))
        default_sa = "/api/v1/namespaces/default/serviceaccounts/default"
        procs.wait_until(
            lambda: self._get(default_sa) == 200, "the default ServiceAccount", timeout, [etcd, apiserver, kcm]
        )

    def _launch(self, name: str, args: list[str]) -> procs.ProcessRef:
        ref = procs.start_detached(name, [str(self.bin_dir / name), *args], self.dir / "logs" / f"{name}.log")
        self.processes[name] = ref
        self._save()  # recorded at once so `down` can clean up after a crashed start
        return ref

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            "--name=local",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        port = self.ports["kube-apiserver"]
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer=https://127.0.0.1:{port}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # Endpoints may not hold a loopback IP; nothing here routes to the service IP anyway.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _kcm_args(self, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            # No HTTPS endpoint (health is judged by the API objects it maintains).
            "--secure-port=0",
            f"--controllers={KCM_CONTROLLERS}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            "--profiling=false",
        ]

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _get(self, path: str) -> int:
        """HTTP status of an admin GET against the API server (0 if unreachable)."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        try:
            with urllib.request.urlopen(self.server + path, context=ctx, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def healthy(self) -> bool:
        return self.is_running() and self._get("/readyz") == 200

    def stop(self, purge: bool = False) -> None:
        """Stop the processes (reverse start order); purge also deletes the control-plane dir."""
        for name in reversed(START_ORDER):
            if name in self.processes:
                procs.stop(self.processes[name])
        self.processes = {}
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.ports:
            self._save()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
