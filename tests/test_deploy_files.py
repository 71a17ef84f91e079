"""The compose file is accepted by Docker Compose (skipped where no compose client is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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
    env = {**os.environ, "OPTIFORGE_API_KEY": "k" * 48}
    result = subprocess.run([*compose, *profile, "config"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "OPTIFORGE_BOOTSTRAP_API_KEY: " + "k" * 48 in result.stdout
    for service in ("api", "worker", "redis", "postgres"):
        assert f"  {service}:" in result.stdout
    if profile:
        assert "gpu-worker:" in result.stdout and "nvidia" in result.stdout


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("app", "workers", "engines", "migrations", "sdk"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_the_build_context_leaves_out_the_venv_and_keeps_what_the_dockerfile_copies() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = [
        line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
    ]
    assert {".venv", ".git", "data", "bench", "tests"} <= ignored
    assert copied and not [path for path in copied if path.split("/")[0] in ignored], copied


def test_compose_api_gets_its_first_key_from_the_environment() -> None:
    """The API listens beyond loopback in compose: it needs its first key, and has it only from
    OPTIFORGE_API_KEY (`${VAR:?}` makes compose refuse to start without it)."""
    environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    assert environment["OPTIFORGE_BOOTSTRAP_API_KEY"].startswith("${OPTIFORGE_API_KEY:?")
    assert environment["OPTIFORGE_BROKER_URL"]  # the shared settings are merged in, not replaced


def test_compose_refuses_to_start_without_an_api_key() -> None:
    compose = _compose()
    if compose is None:
        pytest.skip("no docker compose client installed")
    env = {key: value for key, value in os.environ.items() if key != "OPTIFORGE_API_KEY"}
    result = subprocess.run([*compose, "config"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "OPTIFORGE_API_KEY" in result.stderr
