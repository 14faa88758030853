"""Redis goes away and comes back: the backend answers 503 with a reason meanwhile, and recovers alone."""

from __future__ import annotations

import time

from backend.app import create_app
from backend.settings import BackendSettings
from core.labeling import LABEL_CONFIG
from core.settings import Settings
from tests.backend.test_app import annotation_event, interactive_payload, task
from tests.backend.test_prompts import rectangle
from tests.services import RedisServer


def test_redis_down_is_503_and_the_backend_recovers() -> None:
    server = RedisServer().start()
    port = server.port
    try:
        client = create_app(BackendSettings(core=Settings(redis_url=server.url), redis_timeout_s=1.0)).test_client()
        assert client.get("/health").status_code == 200
        assert client.post("/setup", json={"schema": LABEL_CONFIG}).status_code == 200

        server.stop()
        calls = {
            "health": lambda: client.get("/health"),
            "setup": lambda: client.post("/setup", json={"schema": LABEL_CONFIG}),
            "retrieve": lambda: client.post("/predict", json={"tasks": [task(z=z) for z in range(20)]}),
            "interactive": lambda: client.post("/predict", json=interactive_payload(rectangle())),
            "webhook": lambda: client.post("/webhook", json=annotation_event()),
        }
        for name, call in calls.items():
            start = time.monotonic()
            response = call()
            elapsed = time.monotonic() - start
            assert response.status_code == 503, (name, response.json)
            assert response.json["error"] == "QueueUnavailableError"
            assert f"127.0.0.1:{port}" in response.json["reason"] and "unreachable" in response.json["reason"]
            assert elapsed < 5, f"{name} took {elapsed:.1f} s to notice Redis is down"
        # A malformed payload is still the caller's fault, whatever the state of Redis.
        assert client.post("/predict", json={"tasks": "x"}).status_code == 400

        server = RedisServer(port=port).start()
        assert client.get("/health").status_code == 200
        assert client.post("/setup", json={"schema": LABEL_CONFIG}).status_code == 200
        retrieve = client.post("/predict", json={"tasks": [task(z=z) for z in range(20)]})
        assert retrieve.status_code == 200 and retrieve.json["results"] == [[]] * 20
        assert client.post("/webhook", json=annotation_event()).json["status"] == "queued"
    finally:
        server.stop()
