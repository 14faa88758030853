"""Settings from the environment, read once in entry points and passed down.

=================================  =====================================================
variable                           purpose
=================================  =====================================================
``STS_DATA_DIR``                   data directory holding ``cases/`` (case store)
``LABEL_STUDIO_URL``               Label Studio base URL, e.g. ``http://127.0.0.1:8080``
``LABEL_STUDIO_API_KEY``           API token (legacy token or personal access token)
``STS_LS_PROJECT``                 project title to create or reuse
``STS_IMAGE_SERVING``              ``local-files`` (shared disk) or ``upload``
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``  the document root Label Studio serves local files from
``REDIS_URL``                      Redis for the job queues
=================================  =====================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

DEFAULT_PROJECT_TITLE = "Soft-tissue tumours (MRI)"
DEFAULT_LABEL_STUDIO_URL = "http://127.0.0.1:8080"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
IMAGE_SERVING_MODES = ("local-files", "upload")


@dataclass(frozen=True)
class Settings:
    data_dir: Path | None = None
    label_studio_url: str = DEFAULT_LABEL_STUDIO_URL
    label_studio_api_key: str | None = None
    project_title: str = DEFAULT_PROJECT_TITLE
    image_serving: str = "local-files"
    document_root: Path | None = None
    redis_url: str = DEFAULT_REDIS_URL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        serving = env.get("STS_IMAGE_SERVING", "local-files")
        if serving not in IMAGE_SERVING_MODES:
            raise ConfigError(f"STS_IMAGE_SERVING={serving!r}: must be one of {', '.join(IMAGE_SERVING_MODES)}")
        root = env.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        data_dir = env.get("STS_DATA_DIR")
        return cls(
            data_dir=Path(data_dir) if data_dir else None,
            label_studio_url=env.get("LABEL_STUDIO_URL", DEFAULT_LABEL_STUDIO_URL).rstrip("/"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY") or None,
            project_title=env.get("STS_LS_PROJECT", DEFAULT_PROJECT_TITLE),
            image_serving=serving,
            document_root=Path(root) if root else None,
            redis_url=env.get("REDIS_URL", DEFAULT_REDIS_URL),
        )

    def require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise ConfigError("STS_DATA_DIR is not set: the data directory that holds the case store "
                              "(or pass --data-dir)")
        return self.data_dir

    def require_api_key(self) -> str:
        if not self.label_studio_api_key:
            raise ConfigError("LABEL_STUDIO_API_KEY is not set: the Label Studio API token used to create "
                              "tasks (Account & Settings > Access Token), or pass --no-upload")
        return self.label_studio_api_key


FLAG_ON = ("1", "true", "yes", "on")
FLAG_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = True, environ: Mapping[str, str] | None = None) -> bool:
    """An on/off switch from the environment (unset or empty: ``default``), so that every ``STS_*``
    switch reads the same words and a typo fails loudly instead of meaning "on".

    Raises:
        ConfigError: the value is none of 1/true/yes/on or 0/false/no/off (any case).
    """
    raw = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if not raw:
        return default
    if raw in FLAG_ON:
        return True
    if raw in FLAG_OFF:
        return False
    raise ConfigError(f"${name}={raw!r}: expected one of {'/'.join(FLAG_ON)} or {'/'.join(FLAG_OFF)}")
