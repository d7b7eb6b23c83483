"""`vembed pipeline rbac`: the manifests in pipelines/rbac/ rendered for one namespace and service account.

The files in pipelines/rbac/ are the source (reviewed, tested against the calls the SDKs make); this
only fills in where they are applied: the Role and RoleBinding get `metadata.namespace`, every binding's
subject becomes `<namespace>/<service account>`, and the cluster-wide binding is named per namespace so
that several pipeline namespaces can each have one. Rules of a backend that is not wanted are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vembed.errors import ConfigError

RBAC_DIR = Path(__file__).parent / "rbac"
BACKEND_GROUPS = {"trainjob": "trainer.kubeflow.org", "pytorchjob": "kubeflow.org"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def render_rbac(
    namespace: str,
    service_account: str = "pipeline-runner",
    backends: Sequence[str] = ("trainjob", "pytorchjob"),
) -> list[dict[str, Any]]:
    """The RBAC objects for `namespace` (namespaced ones carry it; cluster-scoped ones name it)."""
    for what, value in (("--namespace", namespace), ("--service-account", service_account)):
        if not _DNS_LABEL.match(value or ""):
            raise ConfigError(f"{what} {value!r}: not a valid Kubernetes name (lowercase letters, digits, '-')")
    dropped = {g for b, g in BACKEND_GROUPS.items() if b not in backends}
    out: list[dict[str, Any]] = []
    # Read afresh on every call, so the edits below never reach another call's documents.
    for doc in (d for f in sorted(RBAC_DIR.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d):
        kind = doc["kind"]
        if kind in ("Role", "ClusterRole"):
            doc["rules"] = [r for r in doc["rules"] if not set(r["apiGroups"]) & dropped]
            if not doc["rules"]:
                continue
        if kind in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = namespace
        if kind == "ClusterRoleBinding":
            doc["metadata"]["name"] = f"{doc['metadata']['name']}-{namespace}"
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            doc["subjects"] = [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]
        out.append(doc)
    kept = {d["metadata"]["name"] for d in out if d["kind"] in ("Role", "ClusterRole")}
    return [d for d in out if d["kind"] not in ("RoleBinding", "ClusterRoleBinding") or d["roleRef"]["name"] in kept]


def render_rbac_yaml(namespace: str, service_account: str = "pipeline-runner",
                     backends: Sequence[str] = ("trainjob", "pytorchjob")) -> str:  # fmt: skip
    docs = render_rbac(namespace, service_account, backends)
    header = f"# vembed RBAC for namespace {namespace}, service account {service_account} (vembed pipeline rbac)\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False)
