"""Real servers the tests need, from Debian's packages: find a binary, or install its package with apt-get.

Used by the fixtures that start Prometheus (tests/deploy) and Redis (tests/redis_server.py); a fixture skips,
saying why, only where the binary can neither be found nor installed (no root, no package lists).
"""

import os
import shutil
import subprocess


def located(binary: str) -> str | None:
    return shutil.which(binary) or (f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None)


def apt_get(*args: str) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(["apt-get", *args], env=env, capture_output=True, check=False, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_or_install(binary: str, package: str) -> str | None:
    """Path of `binary`, installing Debian's `package` with apt-get if needed (updating stale lists once)."""
    install = ("install", "-y", "--no-install-recommends", package)
    if located(binary) is None and not apt_get(*install) and apt_get("update", "-q"):
        apt_get(*install)
    return located(binary)
