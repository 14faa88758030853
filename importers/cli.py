"""``import-patient``: a thin shell over ``importers.pipeline.import_patient``.

Exit codes: 0 success; 1 the import failed (or, in batch mode, at least one patient did);
2 bad command line. Progress and the summary go to stderr; ``--json`` prints one JSON
document on stdout (a list in batch mode).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from core.errors import ProjectError
from core.labeling import TISSUE_CLASSES
from core.settings import DEFAULT_PROJECT_TITLE, IMAGE_SERVING_MODES

log = logging.getLogger("importers")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    handler = RichHandler(console=_console(), show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _print_error(console: Any, exc: BaseException, prefix: str = "") -> None:
    """``TypeName: message`` on one unwrapped line (paths stay greppable; no markup from messages)."""
    from rich.markup import escape

    console.print(f"{prefix}[bold red]{type(exc).__name__}[/]: {escape(str(exc))}", soft_wrap=True)


def _summary(result: Any, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Imported {result.case_id}", show_header=False, title_justify="left")
    shape = f"{result.shape[2]}×{result.shape[1]}×{result.shape[0]}"
    table.add_row("reference grid", f"{result.reference_modality}  {shape}"
                  f"  ({result.spacing[0]:.3f}×{result.spacing[1]:.3f}×{result.spacing[2]:.2f} mm)")
    table.add_row("slices", ", ".join(f"{m}: {n}" for m, n in result.slices.items()))
    if result.registration:
        reg = result.registration
        mi = reg["mutual_information"]
        table.add_row("registration", f"{reg['moving']} → {reg['fixed']}: {reg['transform']['rotation_deg']:.2f}°, "
                      f"{reg['transform']['translation_mm']:.2f} mm; MI {mi['before']:.3f} → {mi['after']:.3f} "
                      f"({reg['iterations']} iterations, start: {reg['initialisation']})")
    for label in result.labels:
        table.add_row(f"contour {label['roi']} ({label['modality']})",
                      f"{label['volume_ml']:.1f} mL on {len(label['slices'])} slices")
    table.add_row("Label Studio", f"{result.tasks_created} created, {result.tasks_updated} updated, "
                  f"{result.tasks_unchanged} unchanged")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))
    table.add_row("case folder", result.case_dir)
    console.print(table)
    for warning in result.warnings:
        console.print(f"[bold red]WARNING[/]: {escape(warning)}", soft_wrap=True)


def _make_sync(settings: Any, no_upload: bool) -> Any:
    if no_upload:
        return None
    from core.ls_client import connect
    from importers.tasks import TaskSync, ensure_project

    api_key = settings.require_api_key()
    client = connect(settings.label_studio_url, api_key)
    project_id = ensure_project(client, settings.project_title)
    return TaskSync(client, project_id, serving=settings.image_serving, document_root=settings.document_root,
                    base_url=settings.label_studio_url, api_key=api_key)


def _run_one(folder: Path, options: Any, store: Any, sync: Any, console: Any, show_progress: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from importers.pipeline import import_patient

    labels = {"read": "Reading series", "register": "Registering", "png": "Writing slices",
              "label_studio": "Label Studio tasks"}
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, disable=not show_progress, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{options.patient_id}: {labels.get(stage, stage)}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return import_patient(folder, options, store, sync, progress)


def _read_batch(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="--batch") from exc
    required = {"path", "patient_id"}
    if not rows or not required <= set(rows[0]):
        raise click.BadParameter(f"{path}: needs a header with at least {', '.join(sorted(required))} "
                                 "(optional: tumor_type, tissue, anatomy, t1, t2)", param_hint="--batch")
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("patient_dir", required=False, type=click.Path(path_type=Path))
@click.option("--patient-id", help="Pseudonym used everywhere instead of the DICOM patient fields.")
@click.option("--tumor-type", default="", help="Histology, free text (e.g. myxofibrosarcoma).")
@click.option("--tissue", default="unknown", type=click.Choice(TISSUE_CLASSES, case_sensitive=False),
              help="Tissue class of the tumour.")
@click.option("--anatomy", default="", help="Site, e.g. thigh.")
@click.option("--t1", help="T1 series: folder, NIfTI file or SeriesInstanceUID (when guessing fails).")
@click.option("--t2", help="T2 series: folder, NIfTI file or SeriesInstanceUID.")
@click.option("--reference", default="auto", type=click.Choice(["auto", "T1", "T2"]),
              help="Grid to resample onto (auto: the larger in-plane matrix).")
@click.option("--affine", is_flag=True, help="Refine the rigid registration with an affine one.")
@click.option("--interpolation", default="linear", type=click.Choice(["linear", "bspline"]),
              help="Image interpolation when resampling (labels always use nearest neighbour).")
@click.option("--batch", "batch_csv", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV of patients (path, patient_id, tumor_type, tissue, anatomy, t1, t2); continues past failures.")
@click.option("--data-dir", envvar="STS_DATA_DIR", type=click.Path(path_type=Path), show_envvar=True,
              help="Data directory holding the case store.")
@click.option("--label-studio-url", envvar="LABEL_STUDIO_URL", default="http://127.0.0.1:8080", show_envvar=True)
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="File holding the Label Studio API token (instead of LABEL_STUDIO_API_KEY; never pass it inline).")
@click.option("--project", envvar="STS_LS_PROJECT", default=DEFAULT_PROJECT_TITLE, show_envvar=True,
              help="Label Studio project title (created if missing).")
@click.option("--serve", envvar="STS_IMAGE_SERVING", default="local-files", show_envvar=True,
              type=click.Choice(IMAGE_SERVING_MODES), help="How Label Studio gets the PNGs.")
@click.option("--document-root", envvar="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", show_envvar=True,
              type=click.Path(path_type=Path), help="Label Studio's local-files document root.")
@click.option("--no-upload", is_flag=True, help="Write the case store only; do not touch Label Studio.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(patient_dir: Path | None, patient_id: str | None, tumor_type: str, tissue: str, anatomy: str,
         t1: str | None, t2: str | None, reference: str, affine: bool, interpolation: str, batch_csv: Path | None,
         data_dir: Path | None, label_studio_url: str, api_key_file: Path | None, project: str, serve: str,
         document_root: Path | None, no_upload: bool, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Import a patient's axial T1 and T2 MRI (DICOM or NIfTI) into the case store and Label Studio.

    \b
    Example:
      import-patient /pacs/export/patient7 --patient-id STS-0007 \\
          --tumor-type myxofibrosarcoma --tissue Myxoid --anatomy thigh

    The Label Studio token is read from LABEL_STUDIO_API_KEY or --api-key-file (never from the command
    line, where other users of the machine could read it).
    """
    import os

    from core.case_store import CaseStore
    from core.settings import Settings
    from importers.pipeline import ImportOptions

    _setup_logging(verbose, quiet or as_json)
    console = _console()
    if batch_csv is None and (patient_dir is None or not patient_id):
        raise click.UsageError("give PATIENT_DIR and --patient-id, or --batch CSV")
    try:
        overrides = {"LABEL_STUDIO_URL": label_studio_url, "STS_LS_PROJECT": project, "STS_IMAGE_SERVING": serve}
        if data_dir:
            overrides["STS_DATA_DIR"] = str(data_dir)
        if document_root:
            overrides["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(document_root)
        if api_key_file:
            overrides["LABEL_STUDIO_API_KEY"] = api_key_file.read_text().strip()
        settings = Settings.from_env({**os.environ, **overrides})
        store = CaseStore(settings.require_data_dir())
        sync = _make_sync(settings, no_upload)
    except ProjectError as exc:
        _print_error(console, exc)
        sys.exit(1)

    jobs: list[tuple[Path, dict[str, Any]]] = []
    if batch_csv is not None:
        for row in _read_batch(batch_csv):
            folder = Path(row["path"])
            jobs.append((folder if folder.is_absolute() else batch_csv.parent / folder, {
                "patient_id": row["patient_id"].strip(), "tumor_type": row.get("tumor_type") or "",
                "tissue": row.get("tissue") or "unknown", "anatomy": row.get("anatomy") or "",
                "t1": row.get("t1") or None, "t2": row.get("t2") or None}))
    else:
        assert patient_dir is not None and patient_id
        jobs.append((patient_dir, {"patient_id": patient_id, "tumor_type": tumor_type, "tissue": tissue,
                                   "anatomy": anatomy, "t1": t1, "t2": t2}))

    results: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for folder, fields in jobs:
        try:
            options = ImportOptions(reference=reference, affine=affine, interpolation=interpolation, **fields)
            result = _run_one(folder, options, store, sync, console, show_progress=not (quiet or as_json))
        except ProjectError as exc:
            failures.append((fields["patient_id"], f"{type(exc).__name__}: {exc}"))
            _print_error(console, exc, prefix=f"{fields['patient_id']}: ")
            results.append({"patient_id": fields["patient_id"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(result.to_json())
        if not (quiet or as_json):
            _summary(result, console)

    if batch_csv is not None and not as_json:
        from rich.markup import escape

        console.print(f"{len(jobs) - len(failures)} of {len(jobs)} patients imported")
        for pid, message in failures:
            console.print(f"  [red]failed[/] {pid}: {escape(message)}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(results if batch_csv is not None else results[0], indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
