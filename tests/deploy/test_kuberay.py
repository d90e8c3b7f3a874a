"""deploy/kuberay/rayservice.yaml: a RayService whose Serve application is this project's builder with valid
settings, next to the Redis it names. Parsed here; no Kubernetes cluster runs in the tests."""

import importlib

import pytest
import yaml

from server.settings import Settings
from tests.deploy.conftest import ROOT

MANIFEST = ROOT / "deploy/kuberay/rayservice.yaml"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def application(documents) -> dict:
    (app,) = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])["applications"]
    return app


def test_the_import_path_is_the_application_builder(documents):
    module, name = application(documents)["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_args_are_valid_cluster_settings_pointing_at_the_redis_service(documents, monkeypatch):
    from server import cluster

    built = {}
    monkeypatch.setattr(cluster, "build_application", lambda settings: built.setdefault("settings", settings))
    cluster.app_builder(application(documents)["args"])
    settings: Settings = built["settings"]
    assert settings.cluster and settings.replicas == 2 and settings.device == "cuda"
    service = documents["Service"]
    assert settings.redis_url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


def test_the_builder_refuses_a_single_process_configuration():
    from server.cluster import app_builder

    with pytest.raises(ValueError, match="replicas"):
        app_builder({"redis_url": "redis://r:6379/0"})
