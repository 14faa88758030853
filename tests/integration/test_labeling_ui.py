"""The labeling interface as an annotator sees it, in headless Chromium (Debian's chromium + chromedriver).

Logs into the real Label Studio with the admin's password, opens an imported task and checks that the
header, the slice image and the imported contour (a brush region) are shown; saves a screenshot next
to the test's tmp dir for people to look at.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from importers.cli import main

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HINT = "browser test needs Debian's chromium and chromium-driver (installed by .ci/run) and selenium"


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        selenium = None
    else:
        selenium = webdriver
    if selenium is None or not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail(HINT, pytrace=False)
        pytest.skip(HINT)
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,1000"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout_s: float = 30.0, step_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def test_an_imported_slice_shows_its_image_header_and_contour(phantom_patient, label_studio, ls_client, browser,
                                                               tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    folder, _ = phantom_patient
    result = CliRunner().invoke(main, [str(folder), "--patient-id", "UI-0001", "--tissue", "Myxoid", "-q"], env={
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root),
        "STS_DATA_DIR": str(label_studio.document_root / "data-ui"), "STS_LS_PROJECT": "STS labeling UI"})
    assert result.exit_code == 0, result.output
    project = next(p for p in ls_client.projects.list(title="STS labeling UI") if p.title == "STS labeling UI")
    tasks = list(ls_client.tasks.list(project=project.id, fields="all", page_size=500))
    task = next(t for t in tasks if t.data["modality"] == "T2" and t.predictions
                and t.data["slice_index"] == sorted(x.data["slice_index"] for x in tasks if x.predictions)[3])

    browser.get(f"{label_studio.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(label_studio.username)
    browser.find_element(By.NAME, "password").send_keys(label_studio.password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    assert wait_for(lambda: "/user/login" not in browser.current_url), "login failed"
    browser.get(f"{label_studio.url}/projects/{project.id}/data?task={task.id}")

    header = f"UI-0001 · T2 · slice {task.data['slice_index']} / {task.data['n_slices']}"
    assert wait_for(lambda: header in browser.find_element(By.TAG_NAME, "body").text, 60), "header not shown"

    def image_loaded() -> bool:
        return bool(browser.execute_script(
            "return Array.from(document.images).some(i => i.complete && i.naturalWidth > 0 && "
            "i.src.includes('local-files'))"))

    assert wait_for(image_loaded, 30), "the slice image did not load"
    assert wait_for(lambda: "Tumor" in browser.find_element(By.TAG_NAME, "body").text, 30), "no Tumor region listed"
    shot = tmp_path / "labeling-ui.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
