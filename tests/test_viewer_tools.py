"""The viewer's radiology basics in headless Chromium (issue 14, item 3): window/level rendered
server-side from the DICOM (presets and mouse drag change the pixels), zoom, L/R markers, one colour
per finding with a legend, labels that do not overlap and name the finding or the sentence, a
skipped study shown with its reason (no broken image) that appears by auto-refresh, a layout without
sideways scrolling at 1280 px, and "Clear conversation" that asks first. With
RADVLM_UPDATE_SCREENSHOT=1 the screenshot goes to docs/screenshots/viewer.png."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.results import write_result_files
from inference.result import Box, Region, StudyResult
from tests.api_node_helpers import TOKEN, http, start_node_with_study
from tests.conftest_node import storescu, wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset, write

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshots" / "viewer.png"
SENTENCE = "The cardiac silhouette is enlarged."

# one image's pixels, summarised: drawn onto a canvas and read back (what the page renders)
PIXELS_JS = """
const img = document.getElementById('study-image');
if (!img.complete || !img.naturalWidth) return null;
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d'); g.drawImage(img, 0, 0);
const d = g.getImageData(0, 0, c.width, c.height).data;
let sum = 0, hash = 0;
for (let i = 0; i < d.length; i += 4) { sum += d[i]; hash = (hash * 31 + d[i]) | 0; }
return [img.dataset.window || '', sum, hash];
"""


def rewrite_sr_with_findings(node, study: str) -> None:
    """Three findings, two boxes nearly on top of each other (their labels would collide) and one
    phrase-grounding box named by its sentence."""
    settings = node.settings
    result_dir = Path(settings.node.data_dir) / "results" / study
    result = StudyResult.model_validate_json((result_dir / "result.json").read_text())
    labels = dict.fromkeys(result.labels or {"cardiomegaly": False}, False)
    labels.update({"cardiomegaly": True, "pleural effusion": True, "atelectasis": False})
    regions = (
        Region(task="abnormality_grounding", query="cardiomegaly", label="cardiomegaly",
               boxes=(Box(x1=0.30, y1=0.35, x2=0.70, y2=0.80),)),
        Region(task="abnormality_grounding", query="pleural effusion", label="pleural effusion",
               boxes=(Box(x1=0.32, y1=0.36, x2=0.60, y2=0.90),)),
        Region(task="phrase_grounding", query=SENTENCE, boxes=(Box(x1=0.34, y1=0.37, x2=0.66, y2=0.70),)),
    )
    result = StudyResult.model_validate(result.model_copy(update={
        "findings_text": SENTENCE + " Small right pleural effusion.", "labels": labels,
        "regions": regions}).model_dump())
    selected = node.jobs.instance(node.jobs.study(study)["selected_sop_instance_uid"])
    write_result_files(result, pydicom.dcmread(selected["path"]), settings.sr, result_dir, fhir=False)


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] - 0.5 and b["x"] < a["x"] + a["width"] - 0.5
            and a["y"] < b["y"] + b["height"] - 0.5 and b["y"] < a["y"] + a["height"] - 0.5)


def test_window_level_legend_skipped_state_and_clear_confirmation(tmp_path, tiny_model_dir, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    running = start_node_with_study(tmp_path, tiny_model_dir)
    node, uid = running.node, running.study_uid
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    try:
        rewrite_sr_with_findings(node, uid)
        # the server renders a requested window from the DICOM; a bad one is refused
        status, body, kind = http("GET", f"{running.url}/api/studies/{uid}/image.png?center=100&width=0")
        assert status == 400
        status, body, kind = http("GET", f"{running.url}/api/studies/{uid}/image.png?center=100&width=300")
        assert status == 200 and kind == "image/png"
        status, body, kind = http("GET", f"{running.url}/api/studies/{uid}/image.png?center=100&width=300&preview=100")
        assert status == 200 and Image.open(io.BytesIO(body)).size == (70, 86)  # every 3rd pixel while dragging
        # the DICOM window, re-rendered server-side, is exactly the image the model saw
        display = json.loads(http("GET", f"{running.url}/api/studies/{uid}")[1])["display"]
        default = next(p for p in display["presets"] if p["default"])
        assert (default["center"], default["width"]) == (2048, 4096)
        windowed = http("GET", f"{running.url}/api/studies/{uid}/image.png?center=2048&width=4096")[1]
        model = http("GET", f"{running.url}/api/studies/{uid}/image.png")[1]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(windowed))), np.asarray(Image.open(io.BytesIO(model))))

        browser.set_window_size(1280, 800)
        browser.get(running.url + "/viewer/")
        wait.until(lambda d: d.find_element(By.ID, "token-input").is_displayed())
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#study-list li[data-uid="{uid}"]')).click()
        before = wait.until(lambda d: d.execute_script(PIXELS_JS))
        assert before[0] == "2048,4096"  # the DICOM window is the default
        assert "DICOM window" in Select(browser.find_element(By.ID, "wl-preset")).first_selected_option.text

        # legend: each finding once, each its own colour; the boxes drawn in those colours
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#legend li")) == 3)
        legend = browser.find_elements(By.CSS_SELECTOR, "#legend li")
        names = [li.get_attribute("data-name") for li in legend]
        assert names == ["cardiomegaly", "pleural effusion", SENTENCE]
        colours = [li.get_attribute("data-colour") for li in legend]
        assert len(set(colours)) == 3
        boxes = browser.find_elements(By.CSS_SELECTOR, "#overlay .box.finding")
        box_colours = [b.value_of_css_property("border-top-color") for b in boxes]
        assert len(set(box_colours)) == 3
        # labels name the finding or the sentence ("region" never) and do not overlap
        labels = browser.find_elements(By.CSS_SELECTOR, "#overlay .box.finding > span")
        assert [s.get_attribute("title") for s in labels] == names
        rects = [s.rect for s in labels]
        assert not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1:]), rects

        # orientation markers from Patient Orientation (L, F): rows run to the patient's left, columns to the feet
        assert [browser.find_element(By.ID, "orient-" + side).text for side in ("left", "right", "top", "bottom")] \
            == ["R", "L", "H", "F"]

        # a window preset changes the rendered pixels
        Select(browser.find_element(By.ID, "wl-preset")).select_by_visible_text("High contrast")
        preset = wait.until(lambda d: (p := d.execute_script(PIXELS_JS)) and p[0] != before[0] and p)
        assert preset[1:] != before[1:]
        # so does a mouse drag on the image (window wider to the right, level up/down)
        viewport = browser.find_element(By.ID, "viewport")
        ActionChains(browser).move_to_element(viewport).click_and_hold().move_by_offset(120, 60).release().perform()
        dragged = wait.until(lambda d: (p := d.execute_script(PIXELS_JS)) and p[0] not in (preset[0], "")
                             and not p[0].endswith("preview") and p)
        assert dragged[1:] != preset[1:]
        center, width = (float(v) for v in dragged[0].split(","))
        assert width > float(preset[0].split(",")[1])
        assert browser.find_element(By.ID, "wl-values").text.startswith("C ")

        # zoom keeps the boxes on the image (bounding rects include the CSS transform)
        rect_js = "return JSON.parse(JSON.stringify(arguments[0].getBoundingClientRect()))"
        image = browser.find_element(By.ID, "study-image")
        image_width = browser.execute_script(rect_js, image)["width"]
        browser.find_element(By.ID, "zoom-in").click()
        img = browser.execute_script(rect_js, image)
        assert img["width"] == pytest.approx(image_width * 1.25, rel=0.02)
        box = browser.execute_script(rect_js, boxes[0])
        assert box["x"] - img["x"] == pytest.approx(0.30 * img["width"], abs=3)

        # 1280 px: no sideways scroll
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1280
        browser.find_element(By.ID, "view-reset").click()
        browser.save_screenshot(str(tmp_path / "viewer.png"))

        # Clear conversation asks first; Cancel keeps it, OK deletes it
        node.jobs.add_chat_exchange(uid, "Where is the heart?", "The heart is at [0.35, 0.4, 0.65, 0.75].",
                                    [[0.35, 0.4, 0.65, 0.75]])
        for n in range(12):  # a long conversation scrolls inside the chat, never the page or the image
            node.jobs.add_chat_exchange(uid, f"Question {n}?", "A long answer. " * 20, [])
        browser.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li")) == 26)
        assert browser.execute_script("return document.documentElement.scrollHeight <= window.innerHeight + 1")
        assert browser.execute_script(
            "const c = document.getElementById('chat-log'); return c.scrollHeight > c.clientHeight")
        browser.find_element(By.ID, "chat-clear").click()
        alert = wait.until(lambda d: d.switch_to.alert)
        assert "26 messages" in alert.text and "cannot be undone" in alert.text
        alert.dismiss()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chat-log li")) == 26
        assert len(node.jobs.chat_turns(uid)) == 26
        browser.find_element(By.ID, "chat-clear").click()
        wait.until(lambda d: d.switch_to.alert).accept()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#chat-log li"))
        assert node.jobs.chat_turns(uid) == []

        # a study sent now appears by auto-refresh; skipped, it shows its reason instead of an image
        hand = make_cr_dataset(rows=64, columns=48, pixel_array=chest_phantom(64, 48), BodyPartExamined="HAND")
        sent = storescu(node.scp_port, [write(hand, tmp_path / "hand.dcm")], calling="PACS")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: (node.jobs.study(hand.StudyInstanceUID) or {"state": None})["state"] == "skipped", 60,
                 what="the hand study skipped")
        reason = node.jobs.study(hand.StudyInstanceUID)["reason"]
        item = WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f'#study-list li[data-uid="{hand.StudyInstanceUID}"]'))
        assert item.get_attribute("data-state") == "skipped"
        item.click()
        state = wait.until(lambda d: (s := d.find_element(By.ID, "image-state")).is_displayed() and s)
        assert "Skipped" in state.text and reason in state.text
        assert not browser.find_element(By.ID, "study-image").is_displayed()
        assert browser.find_element(By.ID, "study-image").get_attribute("src") in (None, "")
        assert not browser.find_element(By.ID, "toolbar").is_displayed()
        assert browser.find_element(By.ID, "chat-status").text == ""  # the status line is per study

        # the study on screen turns failed (here: set in the job store): auto-refresh shows the new
        # state and its reason over the image, which stays
        browser.find_element(By.CSS_SELECTOR, f'#study-list li[data-uid="{uid}"]').click()
        wait.until(lambda d: d.execute_script(PIXELS_JS))
        with node.jobs._tx() as cur:
            cur.execute("UPDATE studies SET state='failed', reason='delivery refused by PACS', updated_at=? "
                        "WHERE study_instance_uid=?", (time.time(), uid))
        banner = WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: (b := d.find_element(By.ID, "image-state")).is_displayed() and b)
        assert "Failed" in banner.text and "delivery refused by PACS" in banner.text
        assert "failed" in browser.find_element(By.ID, "study-header").text
        assert browser.find_element(By.ID, "study-image").is_displayed()
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        node.stop(grace_seconds=5)
    if os.environ.get("RADVLM_UPDATE_SCREENSHOT"):  # refresh the docs picture on purpose, never in CI
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "viewer.png", DOCS_SCREENSHOT)
