"""Build every kustomize overlay in k8s/ and validate each object it renders.

- Kubernetes kinds: against the Kubernetes JSON schemas bundled in kubernetes-validate, strict
  (an unknown field is an error).
- Custom resources: against the openAPIV3Schema of their real CRDs, made strict the same way,
  with their metadata checked against Kubernetes' ObjectMeta:
  - KEDA (ScaledObject, TriggerAuthentication) and prometheus-operator (ServiceMonitor): the CRD
    files in the projects' Go modules, fetched with `go mod download`;
  - Strimzi (Kafka, KafkaNodePool, KafkaTopic, KafkaUser): Strimzi publishes no CRD file in a
    package registry, but its Maven artifacts io.strimzi:api (the CRD classes) and
    io.strimzi:crd-generator (the tool its build makes install/*Crd-*.yaml with) regenerate
    them: Maven resolves the two, a Java >= 21 runs the generator.
- An object of any other kind is an error.
- Consistency of the worker's manifests: the ScaledObject's maxReplicaCount equals the input
  topic's partitions; the grace period outlasts STREAMSINK_SHUTDOWN_SECONDS plus the preStop
  sleep; every ConfigMap and Secret a pod or a CR names exists (or is made by Strimzi).

Not checked: CEL rules (x-kubernetes-validations), admission webhooks, operators' own checks.

kustomize is built from the Go proxy; it and the CRD schemas are cached under
$STREAMSINK_TOOLS_CACHE (default ~/.cache/streamsink/tools), keyed by version.

    python deploy/validate_manifests.py [OVERLAY_DIR ...]   (default: every k8s/overlays/*)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from crd_sources import (
    CACHE,
    ROOT,
    CrdSchema,
    ManifestError,
    Obj,
    build,
    crd_schemas,
)
from kubernetes_validate.utils import all_versions, major_minor
from referencing import Registry, Resource

KUBERNETES_VERSION = "1.35"
WORKER = "streamsink-worker"


def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' ObjectMeta schema (strict), for the metadata of custom resources."""
    version = max(v for v in all_versions() if major_minor(v) == KUBERNETES_VERSION)
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = folder / f"v{version}-local-strict"
    meta = json.loads((folder / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(meta, registry=registry)


def is_kubernetes_group(api_version: str) -> bool:
    """Core API groups: none (v1), a single word (apps, batch, policy...) or *.k8s.io."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"


def check(obj: Obj, schemas: dict[tuple[str, str], CrdSchema], meta: Any) -> tuple[str, list[str]]:
    """How the object was checked, and why the API server would refuse it."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in schemas:
        # OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions.
        validator = jsonschema.Draft4Validator(schemas[key].schema)
        errors = [describe(obj, error) for error in validator.iter_errors(obj)]
        errors += [describe(obj, e, "metadata") for e in meta.iter_errors(obj.get("metadata", {}))]
        return schemas[key].label, errors
    how = f"Kubernetes {KUBERNETES_VERSION} schema"
    if not is_kubernetes_group(key[0]):
        return how, [f"{name_of(obj)}: unknown kind {key[0]} {key[1]} (no CRD schema for it)"]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return how, [f"{name_of(obj)}: unknown kind {key[0]} {key[1]}"]
    except kubernetes_validate.ValidationError as error:
        return how, [describe(obj, error)]
    return how, []


def describe(obj: Obj, error: jsonschema.ValidationError, within: str = "") -> str:
    where = ".".join(map(str, [within, *error.absolute_path] if within else error.absolute_path))
    where = where or "(top)"
    return f"{name_of(obj)}: {where}: {error.message}"


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        obj
        for obj in objects
        if obj.get("kind") == kind and name in (None, obj.get("metadata", {}).get("name"))
    ]


def referenced(node: Any) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap or Secret a pod spec or a CR names."""
    if isinstance(node, list):
        for item in node:
            yield from referenced(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMapRef", "configMapKeyRef", "configMap") and "name" in value:
                yield "ConfigMap", value["name"]
            elif key in ("secretRef", "secretKeyRef") and "name" in value:
                yield "Secret", value["name"]
            elif key == "secret" and "secretName" in value:
                yield "Secret", value["secretName"]
            elif key == "secretTargetRef":  # KEDA
                yield from (("Secret", ref["name"]) for ref in value)
            else:
                yield from referenced(value)


def consistency_errors(objects: list[Obj]) -> Iterator[str]:
    """The worker's manifests fit together (see the module's docstring)."""
    workers = find(objects, "Deployment", WORKER)
    scalers = find(objects, "ScaledObject", WORKER)
    if not workers or not scalers:
        yield f"the build lacks the Deployment or the ScaledObject {WORKER}"
        return
    pod = workers[0]["spec"]["template"]["spec"]
    for trigger in scalers[0]["spec"]["triggers"]:
        topic = trigger["metadata"].get("topic")
        topics = [
            t
            for t in find(objects, "KafkaTopic")
            if t["spec"].get("topicName", t["metadata"]["name"]) == topic
        ]
        partitions = topics[0]["spec"].get("partitions") if topics else None
        if partitions != scalers[0]["spec"].get("maxReplicaCount"):
            yield (
                f"ScaledObject {WORKER}: maxReplicaCount should equal the partitions of its "
                f"topic {topic} ({partitions})"
            )

    config: dict[str, str] = {}
    for kind, name in referenced(pod):
        for configmap in find(objects, kind, name) if kind == "ConfigMap" else []:
            config |= configmap.get("data", {})
    shutdown = int(config.get("STREAMSINK_SHUTDOWN_SECONDS", 60))  # the worker's default
    sleep = sum(
        c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        for c in pod["containers"]
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= shutdown + sleep:
        yield (
            f"Deployment {WORKER}: terminationGracePeriodSeconds {grace} must exceed "
            f"STREAMSINK_SHUTDOWN_SECONDS {shutdown} plus the preStop sleep {sleep}"
        )

    # Secrets the Strimzi operator makes: the cluster CA's, and one per KafkaUser.
    made = {f"{k['metadata']['name']}-cluster-ca-cert" for k in find(objects, "Kafka")}
    made |= {u["metadata"]["name"] for u in find(objects, "KafkaUser")}
    for obj in objects:
        for kind, name in sorted(set(referenced(obj.get("spec")))):
            if not find(objects, kind, name) and not (kind == "Secret" and name in made):
                yield f"{name_of(obj)}: names {kind} {name}, which the build does not make"


def validate_overlay(overlay: Path, schemas: dict[tuple[str, str], CrdSchema]) -> list[str]:
    """The summary line of a valid overlay, or one line per problem."""
    shown = overlay.relative_to(ROOT) if overlay.is_relative_to(ROOT) else overlay
    objects = build(overlay)
    meta = object_meta_validator()
    counts: Counter[str] = Counter()
    problems = []
    for obj in objects:
        how, errors = check(obj, schemas, meta)
        counts[how] += 1
        problems += errors
    problems += consistency_errors(objects)
    if problems:
        return [f"{shown}: INVALID: {problem}" for problem in problems]
    by = ", ".join(f"{count} by {how}" for how, count in sorted(counts.items()))
    return [f"{shown}: OK, {len(objects)} objects: {by}; consistency checked"]


def main(argv: list[str]) -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    overlays = [Path(arg).resolve() for arg in argv] or sorted((ROOT / "k8s/overlays").iterdir())
    try:
        schemas = crd_schemas()
        lines = [line for overlay in overlays for line in validate_overlay(overlay, schemas)]
    except ManifestError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if any(": INVALID: " in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
