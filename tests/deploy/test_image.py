"""The container image, built and run for real by docker/check_image.py (marker `docker`: not in `make test`).

    .venv/bin/python -m pytest -m docker tests/deploy/test_image.py     # or: make image-check

Skipped, with the script's reason, only where no Docker engine can run (its exit status 77).
"""

import subprocess
import sys

import pytest

from tests.deploy.conftest import DOCKER

NO_ENGINE = 77


@pytest.mark.docker
def test_image_builds_serves_and_is_scraped(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(DOCKER / "check_image.py"), "--report", str(report)],
                            capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode == NO_ENGINE:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "every check passed" in result.stdout and report.exists()
