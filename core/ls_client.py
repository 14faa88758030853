"""Talking to Label Studio through label-studio-sdk, with errors that say what failed.

Used by the importer (tasks), the exporter (annotations) and the workers (predictions). The
SDK and httpx are imported inside the functions, so ``core`` stays importable with numpy and
SimpleITK alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from core.errors import LabelStudioError

DEFAULT_TIMEOUT_S = 60.0


def call(what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one SDK call, turning its errors into ``LabelStudioError`` that says what failed.

    >>> call("divide", lambda: 1 // 1)
    1
    """
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return func(*args, **kwargs)
    except ApiError as exc:
        body = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, default=str)[:500]
        raise LabelStudioError(f"Label Studio refused to {what}: HTTP {exc.status_code}: {body}") from exc
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"cannot reach Label Studio to {what}: {exc}") from exc


def connect(url: str, api_key: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A ``LabelStudio`` client, checked with one cheap authenticated request (fails early on a bad token)."""
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=url, api_key=api_key, timeout=timeout_s)
    call(f"authenticate at {url} (check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)", client.users.whoami)
    return client


def find_project(client: Any, title: str) -> int | None:
    """The id of the project called ``title`` (titles are not unique in Label Studio: the first wins)."""
    for project in call("list projects", client.projects.list, title=title):
        if project.title == title:
            return int(project.id)
    return None
