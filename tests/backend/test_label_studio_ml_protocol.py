"""label-studio-ml 1.0.9 on the maintained Flask/Werkzeug we install, and our backend speaking its protocol.

``scripts/install.sh`` installs label-studio-ml without its 2021 pins (Flask 1.1.2, Werkzeug 2.0.2, which
have CVEs); these tests show that its own server runs on what we install instead, and that
``backend.app`` answers the routes Label Studio calls with the same reply shapes as ``label_studio_ml.api``.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import redis

from backend.app import create_app
from backend.settings import BackendSettings
from core.labeling import LABEL_CONFIG
from core.settings import Settings


def major(distribution: str) -> int:
    return int(importlib.metadata.version(distribution).split(".")[0])


@pytest.fixture(scope="module")
def reference_client():
    """label_studio_ml's own app with a trivial model."""
    from label_studio_ml.api import init_app
    from label_studio_ml.model import LabelStudioMLBase

    class Empty(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return [{"result": [], "score": 0.0} for _ in tasks]

    return init_app(model_class=Empty).test_client()


@pytest.fixture
def our_client(redis_db: redis.Redis, redis_url: str):
    return create_app(BackendSettings(core=Settings(redis_url=redis_url))).test_client()


def test_label_studio_ml_runs_on_maintained_flask_and_werkzeug(reference_client) -> None:
    assert importlib.metadata.version("label-studio-ml") == "1.0.9"
    assert major("flask") >= 3 and major("werkzeug") >= 3
    health = reference_client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP"
    setup = reference_client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG,
                                                  "hostname": "http://127.0.0.1:8080", "access_token": "t"})
    assert setup.status_code == 200 and "model_version" in setup.json


@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("get", "/health", None),
        ("post", "/setup", {"project": "1.1", "schema": LABEL_CONFIG, "hostname": "http://127.0.0.1:8080",
                            "access_token": "t"}),
        ("post", "/predict", {"tasks": [], "project": "1.1", "label_config": LABEL_CONFIG, "params": {}}),
    ],
)
def test_our_replies_have_label_studio_ml_shapes(reference_client, our_client, method, route, body) -> None:
    reference = getattr(reference_client, method)(route, json=body)
    ours = getattr(our_client, method)(route, json=body)
    assert reference.status_code == ours.status_code == 200, (reference.json, ours.json)
    missing = set(reference.json) - set(ours.json) - {"model_dir"}  # a label-studio-ml storage detail
    assert not missing, f"{route}: our reply lacks {sorted(missing)}: {ours.json}"
    for key in set(reference.json) & set(ours.json):
        assert type(ours.json[key]) is type(reference.json[key]), (route, key)
