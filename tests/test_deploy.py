"""deploy/: every file parses and they agree with each other and with the gateway.

The image, compose, Kubernetes and systemd each start ``sessiongate serve``
with flags the real CLI parser accepts, on the port their health checks,
probes, Service and nginx upstreams use. The shipped configs load as valid
settings, and a real gateway started from the example config answers the
probe paths the manifests name. (No Docker engine runs here: images are not
built.)
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sessiongate._problem import PROBLEM_TYPE_BASE
from sessiongate.gateway.cli import build_parser, with_default_command
from sessiongate.gateway.settings import GatewaySettings
from tests.support import REPO_ROOT, GatewayProcess

DEPLOY = REPO_ROOT / "deploy"
PORT = 8787
EXAMPLE_CONFIG = DEPLOY / "sessiongate.example.json"


def serve_args(argv: list[str]) -> Any:
    """Parse a command line (after the ``sessiongate`` program name) with the real CLI parser."""
    args = build_parser().parse_args(with_default_command(argv))
    assert args.command == "serve", argv
    return args


def yaml_file(relative: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / relative).read_text())


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_is_slim_non_root_and_serves_on_all_interfaces() -> None:
    instructions = dockerfile_instructions()
    images = [value.split()[0] for name, value in instructions if name == "FROM"]
    assert images and all(image.endswith("-slim") for image in images)
    users = [value for name, value in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    final_stage = instructions[max(i for i, (name, _) in enumerate(instructions) if name == "FROM"):]
    entrypoint = json.loads(next(value for name, value in final_stage if name == "ENTRYPOINT"))
    command = json.loads(next(value for name, value in final_stage if name == "CMD"))
    assert entrypoint == ["sessiongate"]
    args = serve_args(command)
    assert (args.host, args.port) == ("0.0.0.0", PORT)
    assert ("EXPOSE", str(PORT)) in final_stage
    healthcheck = next(value for name, value in final_stage if name == "HEALTHCHECK")
    assert f"http://127.0.0.1:{PORT}/healthz" in healthcheck
    assert json.loads(healthcheck.split("CMD", 1)[1])[0] == "python"  # slim has no curl


def test_dockerfile_copies_what_the_package_needs_from_the_repository() -> None:
    sources = [value.split()[:-1] for name, value in dockerfile_instructions()
               if name == "COPY" and not value.startswith("--from")]
    copied = {source for group in sources for source in group}
    assert {"pyproject.toml", "app", "middleware"} <= copied
    assert all((REPO_ROOT / source).exists() for source in copied), copied
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert not copied & ignored


def test_the_image_installs_the_gateway_and_redis_extras() -> None:
    """``pip install sessiongate`` is only the library: the image serves the gateway and talks to Redis."""
    runs = [value for name, value in dockerfile_instructions() if name == "RUN" and "pip " in value]
    assert any("pip wheel" in run and "[gateway,redis]" in run for run in runs), runs
    assert any("pip install" in run and "sessiongate[gateway,redis]" in run for run in runs), runs


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "data"} <= ignored


# compose


def test_compose_runs_two_gateways_that_share_only_redis() -> None:
    """Transcripts in Redis: each gateway has its own data volume, no volume is mounted by two services."""
    compose = yaml_file("compose.yaml")
    services = compose["services"]
    assert set(services) == {"redis", "gateway-a", "gateway-b", "nginx"}
    gateways = [services["gateway-a"], services["gateway-b"]]
    data_volumes = [next(v.split(":")[0] for v in gateway["volumes"] if v.endswith(":/data")) for gateway in gateways]
    assert len(set(data_volumes)) == 2 and set(data_volumes) <= set(compose["volumes"])
    named_mounts = [v.split(":")[0] for service in services.values() for v in service.get("volumes", [])
                    if not v.startswith("./")]
    assert len(named_mounts) == len(set(named_mounts)), "a named volume is shared between services"
    for gateway in gateways:
        args = serve_args(gateway["command"])
        assert (args.host, args.port) == ("0.0.0.0", PORT)
        environment = gateway["environment"]
        assert environment["SESSIONGATE_BACKEND__URL"].startswith("redis://redis:6379/")
        assert environment["SESSIONGATE_TRANSCRIPT__URL"] == environment["SESSIONGATE_BACKEND__URL"]
        assert environment["SESSIONGATE_DATA_DIR"] == "/data"
        config_mount = next(v for v in gateway["volumes"] if v.endswith(":/etc/sessiongate/config.json:ro"))
        assert (DEPLOY / config_mount.split(":")[0]).resolve() == EXAMPLE_CONFIG.resolve()
        assert environment["SESSIONGATE_CONFIG"] == "/etc/sessiongate/config.json"
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (REPO_ROOT / "deploy" / gateway["build"]["context"] / gateway["build"]["dockerfile"]).exists()
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--appendfsync") + 1] == "always"  # nothing acknowledged is lost
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] and nginx["ports"][0].endswith(":80")
    assert {"gateway-a", "gateway-b"} <= set(nginx["depends_on"])


def test_compose_environment_is_valid_settings() -> None:
    environment = yaml_file("compose.yaml")["services"]["gateway-a"]["environment"]
    env = {key: value for key, value in environment.items() if key != "SESSIONGATE_CONFIG"}
    settings = GatewaySettings.load(EXAMPLE_CONFIG, env=env)
    assert settings.backend.url == settings.transcript.url == "redis://redis:6379/0"
    assert str(settings.data_dir) == "/data"


def test_compose_gateways_trust_exactly_the_nginx_in_front_of_them() -> None:
    compose = yaml_file("compose.yaml")
    nginx_address = compose["services"]["nginx"]["networks"]["default"]["ipv4_address"]
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(subnet)
    for name in ("gateway-a", "gateway-b"):
        environment = compose["services"][name]["environment"]
        env = {key: value for key, value in environment.items() if key != "SESSIONGATE_CONFIG"}
        assert GatewaySettings.load(EXAMPLE_CONFIG, env=env).server.trusted_proxies == [nginx_address]


# nginx


def nginx_directives(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_nginx_balances_both_gateways_and_passes_contention_answers_through() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    directives = nginx_directives(text)
    body = "\n".join(directives)
    assert body.count("{") == body.count("}")
    assert all(line.endswith((";", "{", "}")) or line.startswith("return 503") for line in directives)
    upstream = re.search(r"upstream (\S+) \{(.*?)\}", body, re.S)
    assert upstream is not None
    servers = re.findall(r"server (\S+?):(\d+)", upstream.group(2))
    compose_gateways = {name for name in yaml_file("compose.yaml")["services"] if name.startswith("gateway")}
    assert {name for name, _ in servers} == compose_gateways
    assert {int(port) for _, port in servers} == {PORT}
    assert f"proxy_pass http://{upstream.group(1)};" in directives
    for timeout in ("proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout"):
        assert any(line.startswith(timeout + " ") for line in directives)
    assert "proxy_pass_header Retry-After;" in directives
    assert not any(line.startswith("proxy_hide_header") for line in directives)
    next_upstream = next(line for line in directives if line.startswith("proxy_next_upstream "))
    assert "non_idempotent" not in next_upstream and "http_5" not in next_upstream  # never resend a turn
    assert "proxy_intercept_errors off;" in directives  # the gateways' problem+json answers stay intact
    # the edge proxy replaces a client's own X-Forwarded-For (the gateways believe this one), keeps Host's port
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in directives
    assert "proxy_set_header Host $http_host;" in directives


def test_nginx_own_error_is_a_problem_with_retry_after() -> None:
    body = "\n".join(nginx_directives((DEPLOY / "nginx.conf").read_text()))
    assert "add_header Retry-After 1 always;" in body
    assert "default_type application/problem+json;" in body
    problem = json.loads(re.search(r"return 503 '(.*?)';", body).group(1))
    assert problem["type"] == PROBLEM_TYPE_BASE + "backend-unavailable"
    assert problem["status"] == 503 and problem["retryAfterMs"] >= 1000


# Kubernetes


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            objects[document["kind"]] = document
    return objects


def test_k8s_has_every_object_and_kustomization_lists_each_file() -> None:
    objects = k8s_objects()
    assert set(objects) == {"ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"}  # no shared claim
    listed = set(yaml_file("k8s/kustomization.yaml")["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_deployment_probes_command_volumes_and_security() -> None:
    objects = k8s_objects()
    deployment = objects["StatefulSet"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod["spec"]["containers"]
    args = serve_args(container["args"])
    assert (args.host, args.port) == ("0.0.0.0", PORT)
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert port_names == {"http": PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["periodSeconds"] < container["livenessProbe"]["periodSeconds"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    (claim,) = deployment["spec"]["volumeClaimTemplates"]  # one volume per pod, never shared
    assert mounts["/data"] == claim["metadata"]["name"] and mounts["/data"] not in volumes
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["spec"]["serviceName"] == objects["Service"]["metadata"]["name"]
    config_map = volumes[mounts["/etc/sessiongate"]]["configMap"]["name"]
    assert config_map == objects["ConfigMap"]["metadata"]["name"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["SESSIONGATE_CONFIG"] == "/etc/sessiongate/config.json"


def test_k8s_service_and_disruption_budget_select_the_pods() -> None:
    objects = k8s_objects()
    labels = objects["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == "http"
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= budget["minAvailable"] < objects["StatefulSet"]["spec"]["replicas"]


def test_k8s_config_map_is_the_example_config_and_valid() -> None:
    config = json.loads(k8s_objects()["ConfigMap"]["data"]["config.json"])
    assert config == json.loads(EXAMPLE_CONFIG.read_text())
    settings = GatewaySettings.load(EXAMPLE_CONFIG, env={})
    assert settings.backend.url.startswith("redis://") and settings.transcript.url == settings.backend.url
    assert str(settings.data_dir) == "/data"
    assert settings.server.trusted_proxies  # the ingress in front of the pods names the clients


# systemd


def unit_entries(path: Path) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def test_systemd_unit_runs_serve_as_a_service_user_and_restarts_on_failure() -> None:
    unit = unit_entries(DEPLOY / "sessiongate.service")
    (exec_start,) = unit["Service.ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert Path(program).name == "sessiongate"
    args = serve_args(argv)
    assert args.port == PORT and args.host == "127.0.0.1"  # behind a local nginx
    assert args.data_dir == "/var/lib/" + unit["Service.StateDirectory"][0]
    assert unit["Service.User"][0] not in ("root", "0")
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]
    environment = dict(item.split("=", 1) for item in unit["Service.Environment"])
    assert environment["SESSIONGATE_BACKEND__URL"].startswith("redis://127.0.0.1:")
    GatewaySettings.load(EXAMPLE_CONFIG, env=environment)


# the probes the manifests name exist on a real gateway started from the example config


@pytest.mark.redis
def test_gateway_from_the_example_config_answers_the_probes(tmp_path: Path, redis_url: str) -> None:
    config = json.loads(EXAMPLE_CONFIG.read_text())
    config["backend"]["url"] = config["transcript"]["url"] = redis_url
    with GatewayProcess(tmp_path / "data", config) as gateway:
        assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200
