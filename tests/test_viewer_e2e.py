"""End to end in headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium; no
browser download): a CR sent to a real running node is inferred, its SR stored; the viewer opens
the study, shows the image and the SR's box, answers a question, and keeps the conversation
across a reload. A screenshot goes to the test's temp dir (docs/screenshots/viewer.png comes from
tests/test_viewer_tools.py)."""

from __future__ import annotations

import pytest

from tests.api_node_helpers import BOX, TOKEN, start_node_with_study

def test_viewer_shows_image_box_and_answers(tmp_path, tiny_model_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running = start_node_with_study(tmp_path, tiny_model_dir)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    try:
        browser.get(running.url + "/viewer/")
        banner = browser.find_element(By.ID, "banner")
        assert "UNVERIFIED AI RESULT" in banner.text and "radiologist" in banner.text
        wait.until(lambda d: d.find_element(By.ID, "token-input").is_displayed())
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()

        item = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#study-list li[data-uid="{running.study_uid}"]'))
        assert item.get_attribute("data-state") == "written"
        item.click()
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('study-image'); return i.complete && i.naturalWidth;") == 208)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#overlay .box.finding"))
        assert "cardiomegaly" in box.text
        image_rect = browser.find_element(By.ID, "study-image").rect
        box_rect = box.rect
        # the drawn box sits where the SR's normalised box says, relative to the displayed image
        assert box_rect["x"] - image_rect["x"] == pytest.approx(BOX.x1 * image_rect["width"], abs=3)
        assert box_rect["y"] - image_rect["y"] == pytest.approx(BOX.y1 * image_rect["height"], abs=3)
        assert box_rect["width"] == pytest.approx((BOX.x2 - BOX.x1) * image_rect["width"], abs=4)
        assert "enlarged" in browser.find_element(By.ID, "findings-text").text
        assert "cardiomegaly" in browser.find_element(By.CSS_SELECTOR, "#labels span.present").text

        # toggling the finding hides and shows its box
        toggle = browser.find_element(By.CSS_SELECTOR, "#regions input[type=checkbox]")
        toggle.click()
        assert not box.is_displayed()
        toggle.click()
        assert box.is_displayed()

        browser.find_element(By.ID, "chat-input").send_keys("Where is the cardiomegaly located?")
        browser.find_element(By.ID, "chat-send").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#chat-log li.assistant"))
        wait.until(lambda d: "answered in" in d.find_element(By.ID, "chat-status").text)
        assert "RadVLM" in answer.text
        browser.save_screenshot(str(tmp_path / "viewer.png"))

        # the conversation is kept in the job store: a reload shows it again (token in sessionStorage).
        # A random tiny model answers without coordinates, so to check that an answer's boxes are
        # drawn, a stored exchange with a grounded answer (as a trained model gives) is added first.
        running.node.jobs.add_chat_exchange(
            running.study_uid, "Where is the heart located?",
            "The heart is located at the coordinates [0.35, 0.4, 0.65, 0.75] on the image.", [[0.35, 0.4, 0.65, 0.75]])
        browser.refresh()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li")) == 4)
        roles = [li.get_attribute("class") for li in browser.find_elements(By.CSS_SELECTOR, "#chat-log li")]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert running.node.jobs.chat_turns(running.study_uid)[0]["text"] == "Where is the cardiomegaly located?"
        chat_box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#overlay .box.chat"))
        assert chat_box.is_displayed() and chat_box.rect["width"] > 50
        assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay .box.finding")) == 1
        browser.save_screenshot(str(tmp_path / "viewer-after-reload.png"))
    finally:
        running.node.stop(grace_seconds=5)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000
