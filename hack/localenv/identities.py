"""Credentials for ServiceAccounts in a world without kubelets.

A kubelet gives a Pod's containers a token for the Pod's ServiceAccount, bound to the Pod
(and through the Pod's ``spec.nodeName`` to its Node). Here nothing runs Pods, so the
same is done by hand: ``TokenRequest`` for the ServiceAccount, optionally bound to a
placeholder Pod that names the node. Since Kubernetes 1.32 (ServiceAccountTokenPodNodeInfo)
such a token authenticates with ``userInfo.extra["authentication.kubernetes.io/node-name"]``
— what the chart's admission policy checks for agents. The placeholder Pod stays Pending
(no scheduler, no kubelet); deleting it invalidates the tokens bound to it.
"""

from __future__ import annotations

import json
from base64 import b64encode, urlsafe_b64decode
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
PLACEHOLDER_IMAGE = "registry.k8s.io/pause:3.10"  # never pulled: no kubelet runs the Pod
PLACEHOLDER_LABEL = "localenv.libvirt-operator.io/identity-placeholder"


def placeholder_pod(api: client.ApiClient, namespace: str, service_account: str, node: str) -> client.V1Pod:
    """The Pod (created if missing) that binds `service_account` tokens to `node`."""
    core = client.CoreV1Api(api)
    name = f"{service_account}-identity-{node}"[:253]
    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    else:
        if pod.spec.node_name == node and pod.spec.service_account_name == service_account:
            return pod
        raise RuntimeError(f"pod {namespace}/{name} exists for another node or service account")
    body = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels={PLACEHOLDER_LABEL: "true"}),
        spec=client.V1PodSpec(
            node_name=node,  # set directly: bound to the node without a scheduler
            service_account_name=service_account,
            automount_service_account_token=False,
            containers=[client.V1Container(name="placeholder", image=PLACEHOLDER_IMAGE)],
            termination_grace_period_seconds=0,
        ),
    )
    return core.create_namespaced_pod(namespace, body)


def delete_placeholder(api: client.ApiClient, pod: client.V1Pod) -> None:
    """Delete at once (no kubelet would ever confirm a graceful deletion); tokens bound to it stop working."""
    try:
        client.CoreV1Api(api).delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            raise


def request_token(api: client.ApiClient, namespace: str, service_account: str, *,
                  pod: client.V1Pod | None = None, expiration_seconds: int = 3600) -> str:
    """A TokenRequest token for the ServiceAccount (default API audiences), bound to `pod` if given."""
    bound = None
    if pod is not None:
        bound = client.V1BoundObjectReference(api_version="v1", kind="Pod", name=pod.metadata.name,
                                              uid=pod.metadata.uid)
    spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds, bound_object_ref=bound)
    review = client.CoreV1Api(api).create_namespaced_service_account_token(
        service_account, namespace, client.AuthenticationV1TokenRequest(spec=spec))
    return review.status.token


def write_token_kubeconfig(path: Path, server: str, ca_cert: Path, token: str, user: str) -> Path:
    """A self-contained kubeconfig that authenticates with a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server, "certificate-authority-data": b64encode(ca_cert.read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def service_account_kubeconfig(api: client.ApiClient, path: Path, namespace: str, service_account: str, *,
                               node: str | None = None, expiration_seconds: int = 3600) -> Path:
    """Write a kubeconfig for `service_account`; with `node`, its token is bound to a placeholder Pod on it.

    The server and CA come from `api` (an admin client of the same cluster).
    """
    pod = placeholder_pod(api, namespace, service_account, node) if node else None
    token = request_token(api, namespace, service_account, pod=pod, expiration_seconds=expiration_seconds)
    cfg = api.configuration
    if not cfg.ssl_ca_cert:
        raise ValueError("the admin client has no CA certificate file to copy into the kubeconfig")
    user = f"system:serviceaccount:{namespace}:{service_account}" + (f"@{node}" if node else "")
    return write_token_kubeconfig(path, cfg.host, Path(cfg.ssl_ca_cert), token, user)


def token_claims(token: str) -> dict:
    """The JWT payload of a ServiceAccount token, unverified (e.g. its `jti`, which audit events carry)."""
    payload = token.split(".")[1]
    return json.loads(urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def kubeconfig_token(path: Path) -> str:
    """The bearer token of a kubeconfig written by write_token_kubeconfig."""
    return yaml.safe_load(path.read_text())["users"][0]["user"]["token"]


def whoami(api: client.ApiClient) -> dict:
    """The caller's user info as the API server sees it (SelfSubjectReview): username, groups, extra."""
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    info = review.status.user_info
    return {"username": info.username, "groups": info.groups or [], "extra": info.extra or {}}
