"""``export-volumes``: reviewed Label Studio annotations → NIfTI volumes + manifests.

Exit codes: 0 success; 1 an error (or at least one case failed); 2 bad command line.
Annotations come from the Label Studio project (``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY``
or ``--api-key-file``) or from a JSON export file (``--from-json``), for offline use.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from core.errors import ProjectError
from core.settings import DEFAULT_PROJECT_TITLE


def _fetch_tasks(settings: Any, project_title: str) -> list[dict[str, Any]]:
    from core.errors import LabelStudioError
    from core.ls_client import call, connect, find_project

    client = connect(settings.label_studio_url, settings.require_api_key())
    project_id = find_project(client, project_title)
    if project_id is None:
        raise LabelStudioError(f"no Label Studio project called {project_title!r} at {settings.label_studio_url}")
    return call(f"export project {project_title!r}", client.projects.exports.as_json, project_id, timeout=600)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder to write one sub-folder per case into (and manifest.json).")
@click.option("--case", "cases", multiple=True, help="Only these case ids (repeatable).")
@click.option("--reviewed-only", is_flag=True, help="Only slices whose annotation is marked Reviewed.")
@click.option("--no-images", is_flag=True, help="Do not copy the image volumes next to the labels.")
@click.option("--from-json", "export_json", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Read a Label Studio JSON export instead of asking the server.")
@click.option("--data-dir", envvar="STS_DATA_DIR", type=click.Path(path_type=Path), show_envvar=True,
              help="Data directory holding the case store (for geometry).")
@click.option("--label-studio-url", envvar="LABEL_STUDIO_URL", default="http://127.0.0.1:8080", show_envvar=True)
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="File holding the Label Studio API token (instead of LABEL_STUDIO_API_KEY).")
@click.option("--project", envvar="STS_LS_PROJECT", default=DEFAULT_PROJECT_TITLE, show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def main(out_dir: Path, cases: tuple[str, ...], reviewed_only: bool, no_images: bool, export_json: Path | None,
         data_dir: Path | None, label_studio_url: str, api_key_file: Path | None, project: str, as_json: bool,
         quiet: bool) -> None:
    """Rebuild annotated slices into NIfTI volumes on each case's reference grid.

    Slices nobody annotated are listed as such in the manifests, never exported as background.

    \b
    Example:
      export-volumes --out /srv/exports/2026-11-23 --reviewed-only
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from core.case_store import CaseStore
    from core.settings import Settings
    from exporters.volumes import export_volumes

    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        overrides = {"LABEL_STUDIO_URL": label_studio_url}
        if data_dir:
            overrides["STS_DATA_DIR"] = str(data_dir)
        if api_key_file:
            overrides["LABEL_STUDIO_API_KEY"] = api_key_file.read_text().strip()
        settings = Settings.from_env({**os.environ, **overrides})
        store = CaseStore(settings.require_data_dir())
        if export_json is not None:
            try:
                tasks = json.loads(export_json.read_text())
            except json.JSONDecodeError as exc:
                raise ProjectError(f"{export_json}: not a Label Studio JSON export ({exc})") from exc
        else:
            with console.status(f"exporting project {project!r} from Label Studio"):
                tasks = _fetch_tasks(settings, project)
        if not isinstance(tasks, list):
            raise ProjectError("the export is not a list of tasks")
        summary = export_volumes(tasks, store, out_dir, reviewed_only=reviewed_only,
                                 cases=list(cases) or None, copy_images=not no_images)
    except ProjectError as exc:
        console.print(f"[bold red]{type(exc).__name__}[/]: {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)

    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    elif not quiet:
        table = Table(title=f"Exported to {out_dir}", title_justify="left")
        for column in ("case", "label", "annotated slices", "volume mL", "max diameter mm", "complete"):
            table.add_column(column)
        for case in summary.cases:
            for label in case["labels"]:
                table.add_row(case["case_id"], f"{label['label']} ({label['modality']})",
                              str(len(label["annotated_slices"])), f"{label['volume_ml']:.1f}",
                              f"{label['max_axial_diameter_mm']:.1f}", "yes" if label["complete"] else "no")
        console.print(table)
        if summary.skipped:
            console.print(f"{len(summary.skipped)} tasks skipped (e.g. {summary.skipped[0]['reason']})")
        for failure in summary.failed:
            console.print(f"[red]failed[/] {failure['case_id']}: {escape(failure['error'])}", soft_wrap=True)
    sys.exit(1 if summary.failed else 0)


if __name__ == "__main__":
    main()
