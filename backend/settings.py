"""The backend's settings, read from the environment once (in ``main`` or the app factory) and passed down.

Besides the shared ``core.settings.Settings`` (``REDIS_URL`` above all), the backend reads:

===========================  ==========================================================================
variable                     purpose
===========================  ==========================================================================
``STS_INTERACTIVE_WAIT_S``   how long an interactive request waits for the worker (default 20 s;
                             Label Studio itself gives up after 100 s)
``STS_WEBHOOK_SECRET``       if set, ``/webhook`` requires header ``X-STS-Webhook-Secret`` to match
``STS_MODEL_VERSION``        pins the automatic model version ``/setup`` reports (else the version the
                             workers publish in Redis, else ``sts-initial``)
``STS_REDIS_TIMEOUT_S``      socket timeout of the backend's short Redis calls (default 2 s)
===========================  ==========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import ConfigError
from core.queues import DEFAULT_INTERACTIVE_TIMEOUT_S, DEFAULT_INTERACTIVE_WAIT_S
from core.settings import Settings

DEFAULT_REDIS_TIMEOUT_S = 2.0
"""Socket timeout of the backend's ordinary Redis calls: a dead Redis is reported within this."""


def _positive_float(env: Mapping[str, str], name: str, default: float, purpose: str) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: not a number ({purpose})") from exc
    if not value > 0:
        raise ConfigError(f"{name}={raw!r}: must be > 0 ({purpose})")
    return value


@dataclass(frozen=True)
class BackendSettings:
    """Everything the backend needs, typed, with defaults.

    Attributes:
        core: the project-wide settings (``redis_url`` is the one the backend uses).
        interactive_wait_s: deadline of an interactive request, from enqueue to reply.
        webhook_secret: shared secret for ``/webhook``; None accepts any caller (Label Studio's
            webhooks carry no authentication, so set it in deployments and add the header in
            Label Studio's webhook settings).
        model_version: pinned automatic model version, or None to follow the workers.
        redis_timeout_s: socket timeout of ordinary Redis calls.
    """

    core: Settings = field(default_factory=Settings)
    interactive_wait_s: float = DEFAULT_INTERACTIVE_WAIT_S
    webhook_secret: str | None = None
    model_version: str | None = None
    redis_timeout_s: float = DEFAULT_REDIS_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.interactive_wait_s > DEFAULT_INTERACTIVE_TIMEOUT_S:
            raise ConfigError(
                f"STS_INTERACTIVE_WAIT_S={self.interactive_wait_s:g}: longer than the interactive job time limit "
                f"({DEFAULT_INTERACTIVE_TIMEOUT_S} s), so a reply could arrive after the job was killed"
            )

    @property
    def redis_url(self) -> str:
        return self.core.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BackendSettings:
        env = os.environ if environ is None else environ
        return cls(
            core=Settings.from_env(env),
            interactive_wait_s=_positive_float(env, "STS_INTERACTIVE_WAIT_S", DEFAULT_INTERACTIVE_WAIT_S,
                                               "seconds an interactive request waits for a worker"),
            webhook_secret=env.get("STS_WEBHOOK_SECRET") or None,
            model_version=env.get("STS_MODEL_VERSION") or None,
            redis_timeout_s=_positive_float(env, "STS_REDIS_TIMEOUT_S", DEFAULT_REDIS_TIMEOUT_S,
                                            "socket timeout of the backend's Redis calls"),
        )
