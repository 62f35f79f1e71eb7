"""Build every kustomize overlay in k8s/ and validate each object it renders.

- Kubernetes kinds: against the Kubernetes JSON schemas bundled in kubernetes-validate,
  strict (an unknown field is an error).
- KEDA (ScaledObject, TriggerAuthentication) and prometheus-operator (ServiceMonitor): against
  the openAPIV3Schema of their real CRDs, taken from the projects' Go modules through the Go
  module proxy, made strict the same way.
- Strimzi (Kafka, KafkaNodePool, KafkaTopic, KafkaUser): Strimzi publishes its CRDs in no
  registry reachable here (its Maven jars carry Java classes, not the CRD YAML), so these get
  a structural check of the fields the operator requires, labelled as such in the output.

kustomize itself is built from the Go proxy once and cached, like the modules.

    python deploy/validate_manifests.py [OVERLAY_DIR ...]   (default: every k8s/overlays/*)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STREAMSINK_TOOLS_CACHE", Path.home() / ".cache/streamsink/tools"))
KUBERNETES_VERSION = "1.33"
KUSTOMIZE = "sigs.k8s.io/kustomize/kustomize/v5@v5.5.0"
CRD_MODULES = {  # apiVersion group -> (Go module, the CRD files in it)
    "keda.sh": (
        "github.com/kedacore/keda/v2@v2.16.1",
        ["config/crd/bases/keda.sh_scaledobjects.yaml",
         "config/crd/bases/keda.sh_triggerauthentications.yaml"],
    ),
    "monitoring.coreos.com": (
        "github.com/prometheus-operator/prometheus-operator@v0.78.2",
        ["example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"],
    ),
}  # fmt: skip
STRIMZI_REQUIRED = {  # kind -> paths under spec the Strimzi operator refuses to run without
    "Kafka": [("kafka",), ("kafka", "listeners")],
    "KafkaNodePool": [("replicas",), ("roles",), ("storage",)],
    "KafkaTopic": [("partitions",), ("replicas",)],
    "KafkaUser": [("authentication",)],
}


class ManifestError(Exception):
    """An object that would be rejected by the API server or its operator."""


def go_env() -> dict[str, str]:
    return {**os.environ, "GOMODCACHE": str(CACHE / "gomod"), "GOFLAGS": "-mod=mod"}


def kustomize_binary() -> Path:
    binary = CACHE / "bin" / "kustomize"
    if not binary.exists():
        env = go_env() | {"GOBIN": str(binary.parent)}
        subprocess.run(["go", "install", KUSTOMIZE], check=True, env=env)
    return binary


def build(overlay: Path) -> list[dict[str, Any]]:
    rendered = subprocess.run(
        [str(kustomize_binary()), "build", str(overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from the CRDs in the Go modules."""
    schemas = {}
    for module, files in CRD_MODULES.values():
        fetched = subprocess.run(
            ["go", "mod", "download", "-json", module],
            check=True,
            capture_output=True,
            text=True,
            env=go_env(),
            cwd=CACHE,
        )
        directory = Path(json.loads(fetched.stdout)["Dir"])
        for name in files:
            crd = yaml.safe_load((directory / name).read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {
        key: {name: strict(field) for name, field in value.items()}
        if key == "properties"
        else strict(value)
        for key, value in schema.items()
    }
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def check_strimzi(obj: dict[str, Any]) -> None:
    kind, spec = obj["kind"], obj.get("spec")
    if obj["apiVersion"] != "kafka.strimzi.io/v1beta2" or kind not in STRIMZI_REQUIRED:
        raise ManifestError(f"unknown Strimzi object {obj['apiVersion']} {kind}")
    if not isinstance(spec, dict):
        raise ManifestError(f"{kind} has no spec")
    for path in STRIMZI_REQUIRED[kind]:
        node: Any = spec
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise ManifestError(f"{kind} lacks spec.{'.'.join(path)}")
            node = node[key]
    if kind != "Kafka" and "strimzi.io/cluster" not in obj["metadata"].get("labels", {}):
        raise ManifestError(f"{kind} {obj['metadata']['name']} names no strimzi.io/cluster")


def validate(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> str:
    """How the object was checked; raises ManifestError if it is invalid."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    name = f"{key[1]} {obj.get('metadata', {}).get('name')}"
    if key in schemas:
        try:
            jsonschema.validate(obj, schemas[key])
        except jsonschema.ValidationError as error:
            where = "/".join(map(str, error.absolute_path))
            raise ManifestError(f"{name}: {error.message} at {where}") from None
        return "crd"
    if key[0].startswith("kafka.strimzi.io/"):
        check_strimzi(obj)
        return "structural (Strimzi)"
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        raise ManifestError(f"{name}: unknown kind {key[0]} {key[1]}") from None
    except kubernetes_validate.ValidationError as error:
        raise ManifestError(f"{name}: {error.message} at {error.path}") from None
    return "kubernetes"


def validate_overlay(overlay: Path, schemas: dict[tuple[str, str], dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for obj in build(overlay):
        how = validate(obj, schemas)
        counts[how] = counts.get(how, 0) + 1
    summary = ", ".join(f"{count} by {how}" for how, count in sorted(counts.items()))
    return f"{overlay.relative_to(ROOT) if overlay.is_relative_to(ROOT) else overlay}: {summary}"


def main(argv: list[str]) -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    overlays = [Path(arg).resolve() for arg in argv] or sorted((ROOT / "k8s/overlays").iterdir())
    schemas = crd_schemas()
    failed = False
    for overlay in overlays:
        try:
            print(validate_overlay(overlay, schemas))
        except ManifestError as error:
            print(f"{overlay.name}: INVALID: {error}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
