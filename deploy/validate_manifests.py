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
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, major_minor
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STREAMSINK_TOOLS_CACHE", Path.home() / ".cache/streamsink/tools"))
KUBERNETES_VERSION = "1.35"
KUSTOMIZE = "sigs.k8s.io/kustomize/kustomize/v5@v5.8.1"  # builds with Go >= 1.24
KEDA = "github.com/kedacore/keda/v2@v2.21.0"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
STRIMZI = "1.2.0"  # io.strimzi:api and io.strimzi:crd-generator, released together
STRIMZI_CLASSES = {
    "Kafka": "io.strimzi.api.kafka.model.kafka.Kafka",
    "KafkaNodePool": "io.strimzi.api.kafka.model.nodepool.KafkaNodePool",
    "KafkaTopic": "io.strimzi.api.kafka.model.topic.KafkaTopic",
    "KafkaUser": "io.strimzi.api.kafka.model.user.KafkaUser",
}
WORKER = "streamsink-worker"

Obj = dict[str, Any]


class ManifestError(Exception):
    """The manifests would be rejected by the API server or do not fit together."""


@dataclass(frozen=True)
class CrdSource:
    """Where some CRDs come from; `fetch` returns the CRD documents."""

    label: str  # e.g. "KEDA v2.21.0 CRD", shown in the summary
    fetch: Callable[[], list[Obj]]


@dataclass(frozen=True)
class CrdSchema:
    """A served version's strict schema, and the label of its source."""

    label: str
    schema: Obj


def run(command: list[str], **kwargs: Any) -> str:
    """stdout of a command that must succeed; its stderr in the error otherwise."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-3000:]
        raise ManifestError(f"{' '.join(command)} failed:\n{output}")
    return result.stdout


def go_env() -> dict[str, str]:
    return {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}


def kustomize() -> list[str]:
    """The kustomize command: built from the Go proxy once, else kubectl's built-in one."""
    module, version = KUSTOMIZE.split("@")
    binary = CACHE / f"kustomize-{version}" / "kustomize"
    if not binary.exists() and shutil.which("go"):
        run(["go", "install", KUSTOMIZE], env=go_env() | {"GOBIN": str(binary.parent)})
    if binary.exists():
        return [str(binary), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise ManifestError(f"neither Go (to install {module}) nor kubectl found")


def build(overlay: Path) -> list[Obj]:
    rendered = run([*kustomize(), str(overlay)])
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def go_module_crds(module: str, files: list[str]) -> Callable[[], list[Obj]]:
    def fetch() -> list[Obj]:
        info = json.loads(run(["go", "mod", "download", "-json", module], env=go_env(), cwd=CACHE))
        return [yaml.safe_load((Path(info["Dir"]) / name).read_text()) for name in files]

    return fetch


def java_21() -> str:
    """A java binary of version 21 or later (the Strimzi generator's class files need it)."""
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin/java")] if home else []
    candidates.append(shutil.which("java") or "")
    candidates += map(str, sorted(Path("/usr/lib/jvm").glob("*/bin/java")))
    for java in filter(None, candidates):
        if not Path(java).exists():
            continue
        banner = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        found = re.search(r'version "(\d+)', banner)
        if found and int(found.group(1)) >= 21:
            return java
    raise ManifestError("Strimzi's CRD generator needs Java >= 21: none found (set JAVA_HOME)")


def strimzi_crds() -> list[Obj]:
    work = CACHE / f"strimzi-{STRIMZI}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>local</groupId><artifactId>strimzi-crds</artifactId><version>0</version>"
        "<dependencies>"
        + "".join(
            f"<dependency><groupId>io.strimzi</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{STRIMZI}</version></dependency>"
            for artifact in ("api", "crd-generator")
        )
        + "</dependencies></project>"
    )
    if not shutil.which("mvn"):
        raise ManifestError("Maven (mvn) is needed to fetch Strimzi's CRD classes")
    run(
        ["mvn", "-B", "-q", "dependency:build-classpath", "-Dmdep.outputFile=classpath.txt"],
        cwd=work,
    )
    outputs = {kind: work / f"{kind}.yaml" for kind in STRIMZI_CLASSES}
    # The options of Strimzi's own build (api/pom.xml) for its install files.
    options = ["--crd-api-version", "v1", "--api-versions", "v1", "--storage-version", "v1"]
    classpath = (work / "classpath.txt").read_text().strip()
    classes = [f"{STRIMZI_CLASSES[kind]}={path}" for kind, path in outputs.items()]
    run(
        [
            java_21(),
            "-cp",
            classpath,
            "io.strimzi.crdgenerator.CrdGenerator",
            *options,
            "--yaml",
            *classes,
        ]
    )
    return [yaml.safe_load(path.read_text()) for path in outputs.values()]


SOURCES = [
    CrdSource(
        f"KEDA {KEDA.split('@')[1]} CRD",
        go_module_crds(
            KEDA,
            [
                "config/crd/bases/keda.sh_scaledobjects.yaml",
                "config/crd/bases/keda.sh_triggerauthentications.yaml",
            ],
        ),
    ),
    CrdSource(
        f"prometheus-operator {PROMETHEUS_OPERATOR.split('@')[1]} CRD",
        go_module_crds(
            PROMETHEUS_OPERATOR,
            [
                "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
            ],
        ),
    ),
    CrdSource(f"Strimzi {STRIMZI} CRD", strimzi_crds),
]


def crd_schemas() -> dict[tuple[str, str], CrdSchema]:
    """(apiVersion, kind) -> the strict schema of every served version, cached per source."""
    schemas = {}
    for source in SOURCES:
        cached = CACHE / "crd-schemas" / (re.sub(r"[^\w.-]+", "_", source.label) + ".json")
        if not cached.exists():
            entries = [
                [
                    f"{crd['spec']['group']}/{version['name']}",
                    crd["spec"]["names"]["kind"],
                    strict(version["schema"]["openAPIV3Schema"]),
                ]
                for crd in source.fetch()
                for version in crd["spec"]["versions"]
                if version.get("served", True)
            ]
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            partial.write_text(json.dumps(entries))
            partial.replace(cached)  # whole or absent, should a run be interrupted
        for api_version, kind, schema in json.loads(cached.read_text()):
            schemas[(api_version, kind)] = CrdSchema(source.label, schema)
    return schemas


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as JSON Schema, refusing unknown fields as the API server prunes them.

    Wherever a schema lists its properties and does not keep unknown fields, others are
    refused; `nullable` admits null; int-or-string admits both.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {
        key: {name: strict(field) for name, field in value.items()}
        if key == "properties"
        else strict(value)
        for key, value in schema.items()
        if key != "description"  # only size in the cache
    }
    preserve = result.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in result and "additionalProperties" not in result and not preserve:
        result["additionalProperties"] = False
    if result.pop("nullable", False) and "type" in result:
        result["type"] = [result["type"], "null"]
    if result.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    return result


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
