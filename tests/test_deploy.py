"""The Kubernetes manifests and Containerfiles against the services they run.

`kubectl kustomize` renders the base and every overlay, kubernetes-validate checks each
object against the Kubernetes schema of KUBERNETES_VERSION (strict: unknown fields fail),
and then the rendered objects are held against the services' own settings parsers: every
TESSERA_* variable is one the service reads, the required ones are set, tokens and
database URLs come from Secrets that docs/deploy.md creates, ports and gRPC probes agree
with the listen address, and the Jobs' and init containers' scripts do what they claim
when run here. Without kubectl the rendering tests skip, except under CI=true.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from nacl.signing import SigningKey

from services.activation_server.store.key_files import KeyDirectory
from tessera.keys import load_or_create_signing_key, load_signing_key
from tests.support.databases import IN_CI
from tests.support.processes import ROOT

# The Kubernetes version whose API schemas the manifests must satisfy (the oldest
# supported cluster: native gRPC probes are GA since 1.27, kubectl here is 1.32).
KUBERNETES_VERSION = "1.32.0"
K8S = ROOT / "deploy" / "k8s"
CONTAINERS = ROOT / "deploy" / "containers"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RENDERED = ["base", "overlays/site", "overlays/vendor"]
METRICS_PORT = 9100
# Values a Secret would hold, to build settings from the manifests.
SECRET_SAMPLES = {
    "database-url": "postgresql+asyncpg://tessera:secret@postgresql:5432/tessera",
    "vendor-token": "vendor-token-sample",
    "operator-token": "operator-token-sample",
    "administrator-token": "administrator-token-sample",
}


@dataclass(frozen=True)
class Service:
    name: str  # Kubernetes name, image and Containerfile name
    package: str  # services.<package>
    prefix: str
    port: int
    # Settings the manifests must set, and which of them only a Secret may hold.
    required: frozenset[str]
    secret: frozenset[str]


COMMON_REQUIRED = {"LISTEN", "DATA_DIR", "DATABASE_URL", "METRICS_LISTEN"}
SERVICES = {
    service.name: service
    for service in [
        Service(
            "activation-server",
            "activation_server",
            "TESSERA_AS_",
            27100,
            frozenset(COMMON_REQUIRED | {"SIGNING_KEY", "VENDOR_TOKEN"}),
            frozenset({"DATABASE_URL", "VENDOR_TOKEN"}),
        ),
        Service(
            "license-server",
            "license_server",
            "TESSERA_LS_",
            27000,
            frozenset(
                COMMON_REQUIRED
                | {"MACHINE_ID", "VENDOR_KEYS", "OPERATOR_TOKEN", "ADMINISTRATOR_TOKEN"}
            ),
            frozenset({"DATABASE_URL", "OPERATOR_TOKEN", "ADMINISTRATOR_TOKEN"}),
        ),
        Service(
            "administrator",
            "administrator",
            "TESSERA_ADMIN_",
            27200,
            frozenset(
                COMMON_REQUIRED | {"ACTIVATION_SERVER", "OPERATOR_TOKEN", "LICENSE_SERVER_TOKEN"}
            ),
            frozenset({"DATABASE_URL", "OPERATOR_TOKEN", "LICENSE_SERVER_TOKEN"}),
        ),
    ]
}
OVERLAY_SERVICES = {
    "base": set(SERVICES),
    "overlays/site": {"license-server", "administrator"},
    "overlays/vendor": {"activation-server"},
}
OVERLAY_NAMESPACES = {"overlays/site": "tessera-site", "overlays/vendor": "tessera-vendor"}

Objects = list[dict[str, Any]]


# -- rendering -------------------------------------------------------------------------


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl:
        return kubectl
    if IN_CI:
        pytest.fail("CI=true but kubectl is not installed: the manifests must be rendered")
    pytest.skip("kubectl is not installed; the Kubernetes manifests are not rendered")


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    kubectl = _kubectl()
    result = {}
    for overlay in RENDERED:
        run = subprocess.run(
            [kubectl, "kustomize", str(K8S / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"kubectl kustomize {overlay} failed:\n{run.stderr}"
        result[overlay] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return result


def named(objects: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def workloads(objects: Objects) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod spec) of every Deployment, StatefulSet and Job."""
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield obj, obj["spec"]["template"]["spec"]


def tessera_workloads(
    objects: Objects,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any], Service]]:
    """(object, pod spec, main container, service) of every Tessera Deployment and Job."""
    for obj, pod in workloads(objects):
        name = obj["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name")
        if name in SERVICES:
            [container] = pod["containers"]
            yield obj, pod, container, SERVICES[name]


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


def container_env(container: dict[str, Any], objects: Objects) -> dict[str, str | SecretRef]:
    """The container's environment: ConfigMap values resolved, Secret values as refs."""
    config_maps = named(objects, "ConfigMap")
    env: dict[str, str | SecretRef] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom only from ConfigMaps"
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = SecretRef(ref["name"], ref["key"])
    return env


def sample_environ(env: Mapping[str, str | SecretRef]) -> dict[str, str]:
    return {
        name: SECRET_SAMPLES[value.key] if isinstance(value, SecretRef) else value
        for name, value in env.items()
    }


def load_settings(service: Service) -> Callable[..., Any]:
    module = importlib.import_module(f"services.{service.package}.config")
    loader: Callable[..., Any] = module.load_settings
    return loader


def variables_read(service: Service) -> set[str]:
    """The environment variables the service's settings parser reads (from its --help)."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": "300"}),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit),
    ):
        load_settings(service)(["--help"], environ={})
    names = set(re.findall(r"\[env\s+(TESSERA_[A-Z0-9_]+)\]", out.getvalue()))
    assert f"{service.prefix}LISTEN" in names, out.getvalue()
    return names


# Settings of issue 6's observability half (--metrics-listen, --log-format), built beside
# these manifests: while a service's parser has no setting of that kind, the manifests may
# set the variable ahead of it; once it has one, the names must match exactly.
AHEAD_OF_PARSER = {"METRICS_LISTEN": "METRICS", "LOG_FORMAT": "LOG_FORMAT"}


def allowed_variables(service: Service) -> set[str]:
    names = variables_read(service)
    for variable, kind in AHEAD_OF_PARSER.items():
        if not any(kind in name for name in names):
            names.add(service.prefix + variable)
    return names


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


def mount_of(container: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The volume mount that holds ``path`` in the container, if any."""
    for mount_path, mount in mounts(container).items():
        if path == Path(mount_path) or Path(mount_path) in path.parents:
            return mount
    return None


# -- schemas ---------------------------------------------------------------------------


def test_every_rendered_object_validates_against_the_pinned_kubernetes_schema(
    rendered: dict[str, Objects],
) -> None:
    failures = []
    for overlay, objects in rendered.items():
        for obj in objects:
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                failures.append(f"{where}: {path}: {error.message}")
            except SchemaNotFoundError as error:
                failures.append(f"{where}: {error.message}")
    assert not failures, "\n".join(failures)


def test_each_overlay_deploys_its_services_in_its_namespace(
    rendered: dict[str, Objects],
) -> None:
    for overlay, expected in OVERLAY_SERVICES.items():
        objects = rendered[overlay]
        assert set(named(objects, "Deployment")) == expected, overlay
        assert set(named(objects, "Service")) - {"postgresql"} == expected, overlay
        assert set(named(objects, "PodDisruptionBudget")) == expected, overlay
        assert set(named(objects, "Job")) == {f"{name}-migrate" for name in expected}
        assert not named(objects, "Secret"), f"{overlay}: secrets are never in the repository"
        namespace = OVERLAY_NAMESPACES.get(overlay)
        if namespace is None:
            continue
        assert set(named(objects, "Namespace")) == {namespace}
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == namespace, obj["metadata"]
        assert "postgresql" in named(objects, "StatefulSet"), overlay
        assert "default-deny" in named(objects, "NetworkPolicy"), overlay


def test_the_vendor_overlay_scales_the_activation_server_by_autoscaler(
    rendered: dict[str, Objects],
) -> None:
    objects = rendered["overlays/vendor"]
    deployment = named(objects, "Deployment")["activation-server"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    autoscaler = named(objects, "HorizontalPodAutoscaler")["activation-server"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "activation-server"
    assert autoscaler["spec"]["minReplicas"] >= 2
    service = named(objects, "Service")["activation-server"]
    assert service["spec"]["type"] == "LoadBalancer"


def test_the_site_license_server_keeps_its_data_directory_on_a_volume_claim(
    rendered: dict[str, Objects],
) -> None:
    objects = rendered["overlays/site"]
    pod = named(objects, "Deployment")["license-server"]["spec"]["template"]["spec"]
    [data] = [volume for volume in pod["volumes"] if volume["name"] == "data"]
    assert set(data) == {"name", "persistentVolumeClaim"}
    assert data["persistentVolumeClaim"]["claimName"] in named(objects, "PersistentVolumeClaim")
    environ = sample_environ(container_env(pod["containers"][0], objects))
    machine_id = environ["TESSERA_LS_MACHINE_ID"]
    assert machine_id, "a stable machine id, or the pod's host name changes the identity"


# -- settings ----------------------------------------------------------------------------


def test_manifests_set_only_variables_the_services_read(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        for obj, _pod, container, service in tessera_workloads(objects):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            env = container_env(container, objects)
            tessera = {name for name in env if name.startswith("TESSERA_")}
            unknown = tessera - allowed_variables(service)
            assert not unknown, f"{where}: {service.name} reads no {sorted(unknown)}"
            if obj["kind"] == "Deployment":
                missing = {service.prefix + name for name in service.required} - tessera
                assert not missing, f"{where}: required settings missing: {sorted(missing)}"
            else:
                assert f"{service.prefix}DATABASE_URL" in tessera, where


def test_tokens_and_database_urls_come_only_from_secrets(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        for config_map in named(objects, "ConfigMap").values():
            for name in config_map.get("data", {}):
                assert not name.endswith(("_TOKEN", "_DATABASE_URL", "PASSWORD")), (
                    f"{overlay}: {name} in ConfigMap {config_map['metadata']['name']}"
                )
        for obj, _pod, container, service in tessera_workloads(objects):
            env = container_env(container, objects)
            for name in service.secret:
                variable = service.prefix + name
                if variable in env:
                    assert isinstance(env[variable], SecretRef), (
                        f"{overlay}: {obj['metadata']['name']}: {variable} must come from a Secret"
                    )


def test_settings_built_from_the_manifests_match_ports_probes_and_volumes(
    rendered: dict[str, Objects],
) -> None:
    for overlay, objects in rendered.items():
        services = named(objects, "Service")
        for obj, pod, container, service in tessera_workloads(objects):
            if obj["kind"] != "Deployment":
                continue
            where = f"{overlay}: {service.name}"
            settings = load_settings(service)(
                [], environ=sample_environ(container_env(container, objects))
            )
            common = settings.common
            assert common.listen == f"0.0.0.0:{service.port}", where
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert ports == {"grpc": service.port, "metrics": METRICS_PORT}, where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == service.port, f"{where}: {probe}"
            [kube_service] = [s for s in services.values() if s["metadata"]["name"] == service.name]
            [service_port] = kube_service["spec"]["ports"]
            assert service_port["port"] == service.port
            assert service_port["targetPort"] in ("grpc", service.port), where
            selector = kube_service["spec"]["selector"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{where}: Service selects no pod"
            assert selector.get("app.kubernetes.io/component") == "server", (
                f"{where}: the Service must not select the migration Job's pod"
            )
            assert common.database_url == SECRET_SAMPLES["database-url"], where
            assert pod["terminationGracePeriodSeconds"] > common.shutdown_grace, where
            annotations = obj["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true", where
            assert annotations["prometheus.io/port"] == str(METRICS_PORT), where
            environ = sample_environ(container_env(container, objects))
            assert port_of(environ[f"{service.prefix}METRICS_LISTEN"]) == METRICS_PORT
            data = mount_of(container, common.data_dir)
            assert data is not None and not data.get("readOnly"), f"{where}: data dir mounted"
            assert mount_of(container, Path("/tmp")) is not None, f"{where}: /tmp mounted"
            check_service_files(where, service, settings, pod, container)


def check_service_files(
    where: str, service: Service, settings: Any, pod: dict[str, Any], container: dict[str, Any]
) -> None:
    """The files each service reads are where the pod puts them."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    data_dir = settings.common.data_dir
    if service.name == "activation-server":
        assert settings.signing_key.parent == data_dir, where
        [init] = pod["initContainers"]
        src, dst = init["command"][-2:]
        assert Path(dst) == data_dir
        data = mount_of(container, data_dir)
        assert data is not None and mounts(init)[dst]["name"] == data["name"], where
        assert volumes[mounts(init)[src]["name"]]["secret"]["secretName"] == (
            "activation-server-keys"
        )
    elif service.name == "license-server":
        assert settings.machine_id, where
        [init] = pod["initContainers"]
        src, dst = init["command"][-2:]
        assert Path(dst) == settings.host_key.parent == data_dir, where
        secret = volumes[mounts(init)[src]["name"]]["secret"]
        assert secret["secretName"] == "license-server-host-key"
        assert [item["key"] for item in secret["items"]] == ["host.key"]
        for path in settings.vendor_keys:
            mount = mount_of(container, path)
            assert mount is not None, f"{where}: {path} is not mounted"
            assert "configMap" in volumes[mount["name"]], where
            assert "subPath" not in mount, f"{where}: subPath mounts never see updates"
    else:
        assert settings.activation_server, where


# -- secrets and config maps created by hand --------------------------------------------


def documented_objects() -> dict[tuple[str, str, str], set[str]]:
    """(namespace, kind, name) -> keys, of every `kubectl create secret generic` and
    `kubectl create configmap` in docs/deploy.md."""
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", DEPLOY_DOC.read_text(), re.M | re.S)
    created: dict[tuple[str, str, str], set[str]] = {}
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        if "kubectl" not in line or " create " not in line:
            continue
        words = shlex.split(line[line.index("kubectl") :], comments=True)
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("-n", "--namespace", default="default")
        parser.add_argument("--from-literal", action="append", default=[])
        parser.add_argument("--from-file", action="append", default=[])
        args, rest = parser.parse_known_args(words[1:])
        if rest[:3] == ["create", "secret", "generic"]:
            kind, name = "Secret", rest[3]
        elif rest[:2] == ["create", "configmap"]:
            kind, name = "ConfigMap", rest[2]
        else:
            continue
        keys = {value.split("=", 1)[0] for value in args.from_literal}
        keys |= {
            value.split("=", 1)[0] if "=" in value else Path(value).name for value in args.from_file
        }
        created.setdefault((args.namespace, kind, name), set()).update(keys)
    return created


def referenced_objects(objects: Objects) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys of every Secret and ConfigMap the pods use that the overlay
    does not render."""
    rendered_config_maps = set(named(objects, "ConfigMap"))
    used: dict[tuple[str, str], set[str]] = {}
    for _obj, pod in workloads(objects):
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                ref = ("Secret", volume["secret"]["secretName"])
                items = volume["secret"].get("items", [])
            elif "configMap" in volume:
                ref = ("ConfigMap", volume["configMap"]["name"])
                items = volume["configMap"].get("items", [])
            else:
                continue
            used.setdefault(ref, set()).update(item["key"] for item in items)
        for container in pod["containers"] + pod.get("initContainers", []):
            for entry in container.get("env", []):
                ref_spec = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref_spec:
                    keys = used.setdefault(("Secret", ref_spec["name"]), set())
                    keys.add(ref_spec["key"])
    return {
        ref: keys
        for ref, keys in used.items()
        if not (ref[0] == "ConfigMap" and ref[1] in rendered_config_maps)
    }


def test_docs_create_every_secret_and_config_map_the_overlays_use(
    rendered: dict[str, Objects],
) -> None:
    created = documented_objects()
    for overlay, namespace in OVERLAY_NAMESPACES.items():
        for (kind, name), keys in referenced_objects(rendered[overlay]).items():
            documented = created.get((namespace, kind, name))
            assert documented is not None, (
                f"{overlay}: docs/deploy.md never creates {kind} {name} in {namespace}"
            )
            assert keys <= documented, (
                f"{overlay}: {kind} {name} needs keys {sorted(keys - documented)}"
            )
    vendor_keys = created[("tessera-vendor", "Secret", "activation-server-keys")]
    assert "vendor-signing.key" in vendor_keys


# -- pods ------------------------------------------------------------------------------------


def test_every_pod_runs_locked_down_with_resources(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        for obj, pod in workloads(objects):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            security = pod["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["runAsUser"] > 0, where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod["automountServiceAccountToken"] is False, where
            for container in pod["containers"] + pod.get("initContainers", []):
                at = f"{where}: container {container['name']}"
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, at
                assert context["allowPrivilegeEscalation"] is False, at
                assert context["capabilities"]["drop"] == ["ALL"], at
                assert "add" not in context["capabilities"], at
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][bound]), at


def test_images_and_commands_name_the_real_services(rendered: dict[str, Objects]) -> None:
    for overlay, objects in rendered.items():
        for obj, pod, container, service in tessera_workloads(objects):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            for each in pod["containers"] + pod.get("initContainers", []):
                image = each["image"].rsplit(":", 1)[0] if "@" not in each["image"] else ""
                assert image.endswith(f"tessera/{service.name}"), f"{where}: {each['image']}"
            assert (CONTAINERS / f"{service.name}.Containerfile").is_file()
            if obj["kind"] == "Deployment":
                # The image's ENTRYPOINT runs the service: no command to override it.
                assert "command" not in container and "args" not in container, where
            else:
                assert container["command"][:2] == ["python", "-c"], where
                assert container["command"][-1] == service.package, where


# -- the scripts in the manifests, run here ----------------------------------------------------


def test_the_migration_jobs_migrate_each_service_database(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    base = rendered["base"]
    clean = {name: value for name, value in os.environ.items() if not name.startswith("TESSERA_")}
    runs = []
    for obj, _pod, container, service in tessera_workloads(base):
        if obj["kind"] != "Job":
            continue
        database = tmp_path / f"{service.package}.db"
        environ = sample_environ(container_env(container, base))
        environ[f"{service.prefix}DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
        command = [sys.executable, *container["command"][1:]]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**clean, **environ},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((service, database, process))
    assert {service.name for service, _, _ in runs} == set(SERVICES)
    for service, database, process in runs:
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, f"{service.name} migration Job failed:\n{output}"
        assert f"{service.package}: migrations applied" in output
        with contextlib.closing(sqlite3.connect(database)) as connection:
            [(version,)] = connection.execute("SELECT version_num FROM alembic_version")
        heads = sorted(
            path.stem.split("_", 1)[0]
            for path in (
                ROOT / "services" / service.package / "store" / "migrations" / "versions"
            ).glob("[0-9]*.py")
        )
        assert version.startswith(heads[-1]), f"{service.name} at {version}, not at head"


def run_init_container(pod: dict[str, Any], src: Path, dst: Path) -> None:
    """Run the pod's init container script with its two directories replaced by ours."""
    [init] = pod["initContainers"]
    shell, flag, script, name, _src, _dst = init["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    run = subprocess.run(
        ["sh", "-c", script, name, str(src), str(dst)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def as_secret_volume(directory: Path) -> None:
    """Give the files the mode a Secret volume with fsGroup gives them."""
    for path in directory.iterdir():
        path.chmod(0o440)


def test_the_vendor_key_copy_gives_the_activation_server_its_keyring(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    pod = named(rendered["base"], "Deployment")["activation-server"]["spec"]["template"]["spec"]
    # What the vendor puts in the Secret after one rotation (docs/deploy.md).
    made = tmp_path / "made"
    keys = KeyDirectory(made / "vendor-signing.key")
    now = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    first, _ = keys.load(now)
    rotated = keys.add_active(SigningKey.generate(), now + dt.timedelta(days=1))
    secret = tmp_path / "secret"
    secret.mkdir()
    for path in [made / "vendor-signing.key", made / "vendor-keys.pub", *keys.directory.iterdir()]:
        shutil.copy(path, secret / path.name)
    as_secret_volume(secret)
    data = tmp_path / "data"
    data.mkdir()
    run_init_container(pod, secret, data)
    copied = KeyDirectory(data / "vendor-signing.key")
    for key_file in [copied.first_key, copied.record, *copied.directory.glob("*.key")]:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    keyring, created = copied.load(now + dt.timedelta(days=2))
    assert not created
    assert keyring.active_key_id == rotated.active_key_id != first.active_key_id
    assert [key.key_id for key in keyring.keys] == [key.key_id for key in rotated.keys]
    assert (data / "vendor-keys.pub").read_text() == (made / "vendor-keys.pub").read_text()


def test_the_vendor_key_copy_refuses_a_secret_without_the_signing_key(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    pod = named(rendered["base"], "Deployment")["activation-server"]["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    run = subprocess.run(
        ["sh", "-c", init["command"][2], "copy", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "vendor-signing.key" in run.stderr


def test_the_host_key_copy_gives_the_license_server_a_key_it_accepts(
    rendered: dict[str, Objects], tmp_path: Path
) -> None:
    pod = named(rendered["overlays/site"], "Deployment")["license-server"]["spec"]["template"][
        "spec"
    ]
    secret = tmp_path / "secret"
    original = load_or_create_signing_key(secret / "host.key").signing_key
    as_secret_volume(secret)
    data = tmp_path / "data"
    data.mkdir()
    run_init_container(pod, secret, data)
    assert stat.S_IMODE((data / "host.key").stat().st_mode) == 0o600
    assert load_signing_key(data / "host.key") == original
    # A restart copies it again over the one the last start left.
    run_init_container(pod, secret, data)
    assert load_signing_key(data / "host.key") == original


# -- Containerfiles --------------------------------------------------------------------------


def containerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


@pytest.mark.parametrize("service", SERVICES.values(), ids=lambda service: service.name)
def test_containerfile_builds_stubs_and_runs_the_service_as_non_root(service: Service) -> None:
    instructions = containerfile_instructions(CONTAINERS / f"{service.name}.Containerfile")
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2 and " AS build" in froms[0], "multi-stage, with a build stage"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "grpc_tools.protoc" in runs and "-I protos" in runs, "stubs generated at build time"
    copies = [rest for word, rest in instructions if word == "COPY"]
    for copy in copies:
        sources = copy.split()[:-1]
        assert not {".", "./", "var", ".venv", "var/"} & set(sources), f"COPY {copy}"
    final = instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM") :]
    [user] = [rest for word, rest in final if word == "USER"]
    assert int(user.split(":")[0]) > 0, "runs as a non-root user"
    [entrypoint] = [rest for word, rest in final if word == "ENTRYPOINT"]
    command = yaml.safe_load(entrypoint)
    assert command == ["python", "-m", f"services.{service.package}"]
    assert importlib.util.find_spec(f"services.{service.package}.__main__") is not None
    [expose] = [rest for word, rest in final if word == "EXPOSE"]
    assert {int(port) for port in expose.split()} == {service.port, METRICS_PORT}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in final if word == "ENV")))
    tessera = {name: value for name, value in env.items() if name.startswith("TESSERA_")}
    assert set(tessera) <= allowed_variables(service)
    assert port_of(tessera[f"{service.prefix}LISTEN"]) == service.port
    assert port_of(tessera[f"{service.prefix}METRICS_LISTEN"]) == METRICS_PORT
    assert not {name for name in tessera if name.endswith(("_TOKEN", "_DATABASE_URL"))}
