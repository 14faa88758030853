"""docker-compose.yml and the scripts agree with the code (no Docker engine here to run them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.services import LS_VERSION

REPO = Path(__file__).resolve().parents[1]


def test_compose_runs_the_label_studio_version_we_test_against() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"label-studio", "redis", "importer", "backend", "worker"} <= set(services)
    assert "backend.app:create_app()" in services["backend"]["command"]
    assert services["worker"]["command"] == ["sts-worker"]
    assert services["label-studio"]["image"].endswith(f":{LS_VERSION}")
    for name, service in services.items():
        assert "healthcheck" in service or name == "importer", f"{name} has no healthcheck"
    env = services["importer"]["environment"]
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == services["label-studio"]["environment"][
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    assert env["STS_DATA_DIR"].startswith(env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"])


def test_secrets_come_from_the_environment_not_the_file() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert re.search(r"LABEL_STUDIO_API_KEY: \$\{LABEL_STUDIO_API_KEY:\?", text)
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_readme_commands_exist() -> None:
    readme = (REPO / "README.md").read_text()
    for script in ("./scripts/stack.sh up", "./scripts/test.sh"):
        assert script in readme
        assert (REPO / script.split()[0]).is_file()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_compose_passes_the_workers_default_box_shrinks_and_lets_an_empty_value_through() -> None:
    """``${STS_BOX_SHRINKS-...}`` (not ``:-``): an empty value must reach the workers, where it means
    the box alone, and the default written in compose must be the code's."""
    from workers.segmentation import DEFAULT_BOX_SHRINKS_PX, parse_box_shrinks

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    value = compose["x-project"]["environment"]["STS_BOX_SHRINKS"]
    match = re.fullmatch(r"\$\{STS_BOX_SHRINKS-([^}]*)\}", value)
    assert match, value
    assert parse_box_shrinks(match.group(1)) == DEFAULT_BOX_SHRINKS_PX
