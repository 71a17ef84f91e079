"""The compose file is accepted by Docker Compose (skipped where no compose client is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_compose_file_is_valid(profile: list[str]) -> None:
    compose = _compose()
    if compose is None:
        pytest.skip("no docker compose client installed")
    result = subprocess.run([*compose, *profile, "config"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for service in ("api", "worker", "redis", "postgres"):
        assert f"  {service}:" in result.stdout
    if profile:
        assert "gpu-worker:" in result.stdout and "nvidia" in result.stdout


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("app", "workers", "engines", "migrations", "sdk"):
        assert f"COPY {package} ./{package}" in dockerfile
