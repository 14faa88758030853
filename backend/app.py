"""The ML backend's HTTP app (Flask): Label Studio's ML-backend routes around ``SegmentationBackend``.

Routes (the label-studio-ml protocol, same reply shapes as ``label_studio_ml.api``):

=========================  =================================================================================
``GET /health``, ``/``     ``{"status": "UP", ...}``; 503 when Redis is unreachable
``POST /setup``            ``{"model_version": v}``; 422 when the labeling config lacks our controls
``POST /predict``          ``{"results": [...], "model_version": v}``: interactive or stored pre-annotations
``POST /webhook``          ``{"status": "queued" | "ignored", ...}``; 403 on a wrong shared secret
``GET|POST /versions``     ``{"versions": [v]}``
``GET /metrics``           ``{}``
=========================  =================================================================================

Every error is JSON ``{"error": "<TypeName>", "reason": "..."}``: 400/422 for payloads we cannot use,
403 for webhooks without the secret, 502 when the worker's job failed, 503 when Redis is down or no
worker listens, 504 when the worker missed the deadline. Label Studio only shows the status line.

Run it::

    sts-backend --host 127.0.0.1 --port 9090          # development server (threaded)

    # production: threads, because an interactive request waits for its worker up to 20 s
    gunicorn --worker-class gthread --workers 2 --threads 16 --timeout 120 \\
        --bind 0.0.0.0:9090 'backend.app:create_app()'

then connect it in Label Studio (Project > Settings > Model, "Interactive preannotations" on), or with
the SDK: ``ls.ml.create(project=ID, url="http://backend:9090", title="sts", is_interactive=True)``.
Environment: ``REDIS_URL`` and the variables in ``backend.settings``; the workers need ``STS_DATA_DIR``,
``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (see ``workers.worker``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import click
import redis
from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.errors import BackendError, PayloadError
from backend.model import WEBHOOK_SECRET_HEADER, SegmentationBackend
from backend.queueing import JobQueues
from backend.settings import BackendSettings
from core.errors import ProjectError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9090
MAX_BODY_BYTES = 256 * 1024 * 1024
"""Bodies past this are refused (413): a retrieve of 1,000 tasks with their brush predictions is tens of MB."""


def _json_body() -> Any:
    """The request's JSON body, whatever its content type; ``PayloadError`` when it is not JSON."""
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # json's parser recurses per nesting level; werkzeug only catches ValueError
        raise PayloadError("the request body is nested too deeply") from None
    if body is None:
        raw = request.get_data(cache=True)
        raise PayloadError("the request body is empty" if not raw.strip() else "the request body is not valid JSON")
    return body


def create_app(settings: BackendSettings | None = None, queues: JobQueues | None = None) -> Flask:
    """Build the app (cheap: Redis is not contacted until the first request).

    Args:
        settings: defaults to ``BackendSettings.from_env()``.
        queues: defaults to clients for ``settings.redis_url``.
    """
    settings = settings or BackendSettings.from_env()
    queues = queues or JobQueues.from_url(settings.redis_url, settings.redis_timeout_s, settings.interactive_wait_s)
    backend = SegmentationBackend(settings, queues)
    app = Flask("sts-backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["sts_backend"] = backend

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(backend.health())

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(_json_body()))

    @app.post("/predict")
    def predict():
        return jsonify(backend.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        # The secret is checked before the body is parsed: an unauthenticated caller learns nothing.
        secret = request.headers.get(WEBHOOK_SECRET_HEADER)
        backend.check_webhook_secret(secret)
        return jsonify(backend.webhook(_json_body(), secret))

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": [backend.model_version()], "model_dir": None})

    @app.get("/metrics")
    def metrics():
        return jsonify({})

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("%s %s -> %s in %.0f ms", request.method, request.path, response.status_code, elapsed_ms)
        return response

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        log.warning("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
        return jsonify({"error": type(exc).__name__, "reason": str(exc)}), exc.http_status

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc: redis.RedisError):
        log.warning("%s %s: Redis error: %s", request.method, request.path, exc)
        return jsonify({"error": "QueueUnavailableError", "reason": f"Redis failed: {exc}"}), 503

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify({"error": exc.name, "reason": exc.description}), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("%s %s failed", request.method, request.path)
        # The exception's text stays in the log: it may quote whatever the payload held.
        return jsonify({"error": "InternalError", "reason": "internal error in the ML backend; see its log"}), 500

    return app


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port to listen on.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(host: str, port: int, log_level: str) -> None:
    """Run the Label Studio ML backend (development server; see the module docstring for gunicorn)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = BackendSettings.from_env()
        app = create_app(settings)
    except ProjectError as exc:
        click.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    log.info("sts-backend on http://%s:%d, Redis %s", host, port, settings.redis_url.rsplit("@", 1)[-1])
    app.run(host=host, port=port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
