"""Real services for tests and the dev stack: Redis and a Label Studio server.

Plain functions and classes (no pytest) so ``tests/conftest.py`` and a dev-stack script can share them.

Label Studio facts this module relies on (checked on label-studio 1.23.2):

* ``label-studio start`` silently moves to the next port when the requested one is busy; we detect the
  ``Port N is in use`` warning and require Django's ``Starting development server at ...:N/`` line.
* The admin user and its legacy token are created only when the user does not exist yet; on a database
  that already has the user, ``LABEL_STUDIO_USER_TOKEN``/``PASSWORD`` are ignored. A database copied from
  the template therefore keeps the template's credentials, which are stored next to it.
* Label Studio reads every setting as ``LABEL_STUDIO_<NAME>``, then ``HEARTEX_<NAME>``, then plain ``<NAME>``,
  so stray variables such as ``DEBUG``, ``PORT``, ``HOST`` or ``USERNAME`` leak into it: they are removed
  from the child's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import redis
import requests

LS_VERSION = "1.23.2"
CACHE_ROOT = Path.home() / ".cache" / "sts-annotate"
DEFAULT_LS_BIN = CACHE_ROOT / f"ls-{LS_VERSION}" / "bin" / "label-studio"
INSTALL_HINT = (
    "Label Studio executable not found: set $LABEL_STUDIO_BIN (or $LABEL_STUDIO_VENV) or install it at "
    f"{DEFAULT_LS_BIN} by running `.ci/install-label-studio.sh`."
)
DB_NAME = "label_studio.sqlite3"

# Unprefixed variables Label Studio would pick up from our environment (see module docstring).
_LEAKY_ENV = {
    "DEBUG", "PORT", "HOST", "USERNAME", "PASSWORD", "USER_TOKEN", "LOG_LEVEL", "DJANGO_DB",
    "DATABASE_NAME", "BASE_DATA_DIR", "DJANGO_SETTINGS_MODULE", "PYTHONPATH", "SENTRY_DSN",
}  # fmt: skip


class LabelStudioNotInstalledError(RuntimeError):
    """The Label Studio executable could not be found (message carries the install hint)."""


class LabelStudioStartError(RuntimeError):
    """Label Studio did not come up; the message carries the tail of its log."""


class LabelStudioPortBusyError(LabelStudioStartError):
    """The requested port was taken, and Label Studio moved to another one (so we stopped it)."""


class _TemplateSuspectError(LabelStudioStartError):
    """The server died or rejected the token: worth retrying without the template DB."""


def find_free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (racy by nature: check after binding)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _terminate_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------------------------- Redis


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """True if the Redis at ``url`` answers PING."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """A private, non-persistent ``redis-server`` on a free loopback port."""

    def __init__(self, executable: str = "redis-server", port: int | None = None):
        self.executable = executable
        self.port = port or find_free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self._dir: str | None = None

    def start(self, timeout: float = 20.0) -> RedisServer:
        exe = shutil.which(self.executable)
        if exe is None:
            raise RuntimeError(f"No Redis answers and `{self.executable}` is not on PATH: install redis-server.")
        self._dir = tempfile.mkdtemp(prefix="sts-redis-")
        log = open(Path(self._dir) / "redis.log", "wb")  # noqa: SIM115 - kept open for the child
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self._dir]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not redis_ping(self.url, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = _tail(Path(self._dir) / "redis.log")
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _terminate_group(self.process)
            self.process = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_url_with_db(url: str, db: int) -> str:
    """``url`` pointing at DB index ``db``. (``Redis.from_url(url, db=n)`` would NOT do it: the URL's
    ``/0`` wins over the keyword.)"""
    return urlsplit(url)._replace(path=f"/{db}").geturl()


def ensure_redis(url_env: str = "REDIS_URL") -> tuple[str, Callable[[], None]]:
    """Return ``(redis_url, stop)``: ``$url_env`` or 127.0.0.1:6379 if it answers PING, else a private server."""
    url = os.environ.get(url_env) or "redis://127.0.0.1:6379/0"
    if redis_ping(url):
        return url, lambda: None
    server = RedisServer().start()
    return server.url, server.stop


# -------------------------------------------------------------------------------------- Label Studio


def find_label_studio_bin() -> Path:
    """``$LABEL_STUDIO_BIN``, else ``$LABEL_STUDIO_VENV/bin/label-studio``, else the default venv."""
    if os.environ.get("LABEL_STUDIO_BIN"):
        candidate = Path(os.environ["LABEL_STUDIO_BIN"]).expanduser()
    elif os.environ.get("LABEL_STUDIO_VENV"):
        candidate = Path(os.environ["LABEL_STUDIO_VENV"]).expanduser() / "bin" / "label-studio"
    else:
        candidate = DEFAULT_LS_BIN
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise LabelStudioNotInstalledError(f"{INSTALL_HINT} (looked at {candidate})")
    return candidate


def label_studio_version(executable: Path) -> str | None:
    """Installed label-studio version, asked from the interpreter in the script's shebang (None if unknown).

    Never use ``label-studio --version``: in 1.23.2 it migrates ~/.local/share/label-studio and then
    STARTS A SERVER on 0.0.0.0:8080 (the ``version`` sub-command only prints, but still migrates).
    """
    try:
        first = executable.read_bytes()[:300].split(b"\n", 1)[0].decode()
        python = first[2:].strip().split()[0] if first.startswith("#!") else "python3"
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, IndexError, UnicodeDecodeError, subprocess.SubprocessError):
        return None


def _random_credentials() -> dict[str, str]:
    return {
        "username": "admin@sts-annotate.test",
        "password": secrets.token_urlsafe(18),
        "token": secrets.token_hex(20),  # 40 hex chars, like Label Studio's own legacy tokens
    }


class LabelStudioServer:
    """A throw-away Label Studio on a free loopback port, started from a migrated template DB when cached.

    ``with LabelStudioServer(document_root=...) as ls: ls.url, ls.token, ...``. The template
    (``~/.cache/sts-annotate/ls-template-<version>/``: the SQLite DB right after the first successful
    start, plus ``credentials.json``) skips the ~30-60 s of migrations; its fixed admin credentials are a
    throw-away secret for loopback only. If the template's token does not authenticate, the server is
    restarted from an empty data dir and the template is rebuilt.
    """

    def __init__(
        self,
        document_root: str | os.PathLike,
        *,
        data_dir: str | os.PathLike | None = None,
        port: int | None = None,
        executable: str | os.PathLike | None = None,
        use_template: bool = True,
        startup_timeout: float = 240.0,
        extra_env: dict[str, str] | None = None,
    ):
        # Label Studio compares storage paths with the document root textually: use the resolved path.
        self.document_root = Path(document_root).resolve()
        self.executable = Path(executable) if executable else find_label_studio_bin()
        self._owns_data_dir = data_dir is None
        if data_dir is not None and Path(data_dir).exists() and any(Path(data_dir).iterdir()):
            raise ValueError(f"data_dir {data_dir} must be empty or absent: its contents are thrown away")
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="sts-ls-")).resolve()
        self.log_path = self.data_dir / "label-studio.log"
        self.requested_port = port
        self.use_template = use_template
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.port: int | None = None
        self.url = ""
        self.username = self.password = self.token = ""
        self.process: subprocess.Popen | None = None
        self.used_template = False
        self.start_seconds: float | None = None
        self.version = label_studio_version(self.executable)
        self.template_dir = CACHE_ROOT / f"ls-template-{self.version}" if self.version else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LabelStudioServer:
        t0 = time.monotonic()
        self.document_root.mkdir(parents=True, exist_ok=True)
        template = self._usable_template() if self.use_template else None
        try:
            self._start_once(template)
        except _TemplateSuspectError:
            if template is None:
                raise
            # The template is suspect (token rejected, DB broken): forget it and start from scratch.
            shutil.rmtree(template, ignore_errors=True)
            self._start_once(None)
        if self.use_template and not self.used_template:
            self._save_template()
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.process is not None:
            _terminate_group(self.process)
            self.process = None
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    # ------------------------------------------------------------------ internals

    def _usable_template(self) -> Path | None:
        t = self.template_dir
        try:
            creds = json.loads((t / "credentials.json").read_text()) if t else {}
        except (OSError, ValueError):
            return None
        if t and (t / DB_NAME).is_file() and {"username", "password", "token"} <= creds.keys():
            return t
        return None

    def _prepare_data_dir(self, template: Path | None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True)
        if template is not None:
            shutil.copyfile(template / DB_NAME, self.data_dir / DB_NAME)
            creds = json.loads((template / "credentials.json").read_text())
        else:
            creds = _random_credentials()
        self.username, self.password, self.token = creds["username"], creds["password"], creds["token"]
        self.used_template = template is not None

    def _env(self, port: int) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if k not in _LEAKY_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))
        }  # fmt: skip
        env.update({
            "PYTHONUNBUFFERED": "1",  # so the "Starting development server" line reaches the log at once
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        })  # fmt: skip
        env.update(self.extra_env)
        return env

    def _start_once(self, template: Path | None, attempts: int = 3) -> None:
        """Start on a free port; retry on another port if Label Studio found ours taken."""
        for attempt in range(attempts):
            self._prepare_data_dir(template)
            port = self.requested_port or find_free_port()
            log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
            cmd = [str(self.executable), "start", "--no-browser", "--internal-host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
            self.process = subprocess.Popen(
                cmd, cwd=self.data_dir, env=self._env(port), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            log.close()
            self.port, self.url = port, f"http://127.0.0.1:{port}"
            try:
                self._wait_ready()
                return
            except LabelStudioPortBusyError:
                _terminate_group(self.process)
                self.process = None
                if self.requested_port or attempt == attempts - 1:
                    raise
            except BaseException:  # incl. KeyboardInterrupt: never leave an orphan server behind
                _terminate_group(self.process)
                self.process = None
                raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        bound = f"Starting development server at http://127.0.0.1:{self.port}/"
        while True:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if f"Port {self.port} is in use" in log:
                raise LabelStudioPortBusyError(f"port {self.port} was busy; Label Studio moved to another port")
            if self.process.poll() is not None:
                raise _TemplateSuspectError(
                    f"Label Studio exited with {self.process.returncode}; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise LabelStudioStartError(
                    f"Label Studio not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            if bound in log and self._get("/health").status_code == 200:
                break
            time.sleep(0.5)
        whoami = self._get("/api/current-user/whoami", headers=self.auth_headers())
        try:
            email = whoami.json().get("email") if whoami.status_code == 200 else None
        except ValueError:
            email = None
        if email != self.username:
            raise _TemplateSuspectError(
                f"legacy token rejected by /api/current-user/whoami ({whoami.status_code}): {whoami.text[:300]}"
            )

    def _get(self, path: str, **kw) -> requests.Response:
        try:
            return requests.get(self.url + path, timeout=5, **kw)
        except requests.RequestException as exc:
            resp = requests.Response()
            resp.status_code, resp._content = 599, str(exc).encode()
            return resp

    def _save_template(self) -> None:
        """Snapshot the freshly migrated DB (user, org, token; nothing else yet) as the template."""
        if self.template_dir is None or self._usable_template() is not None:
            return
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{self.template_dir.name}.tmp-", dir=CACHE_ROOT))
        try:
            src = sqlite3.connect(self.data_dir / DB_NAME)
            dst = sqlite3.connect(tmp / DB_NAME)
            with src, dst:
                src.backup(dst)  # consistent copy while the server runs
            src.close()
            dst.close()
            creds = {"username": self.username, "password": self.password, "token": self.token,
                     "label_studio_version": self.version}  # fmt: skip
            (tmp / "credentials.json").write_text(json.dumps(creds, indent=2))
            os.chmod(tmp / "credentials.json", 0o600)
            shutil.rmtree(self.template_dir, ignore_errors=True)  # a stale/half one
            os.rename(tmp, self.template_dir)  # atomic; loses harmlessly to a concurrent writer
        except (OSError, sqlite3.Error):
            pass  # no template: the next start just migrates again
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
