"""The feedback app: HTTP server and session (with a stand-in trainer), the PNG-mask route and
the real trainer, and the page in a headless Chromium (skipped when Chromium or Playwright is missing).

CI needs, for the browser test: ``apt-get install -y chromium`` and ``pip install playwright``
(never ``playwright install``: the test drives Debian's /usr/bin/chromium).
"""
import http.client
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo_ext.feedback import FeedbackSession, SessionBusy, create_session, start_server
from pxpo_ext.feedback.server import MAX_UPLOAD_BYTES
from pxpo_ext.rewards import HumanFeedbackReward

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


class StandInTrainer:
    """The trainer API the session uses; each epoch brightens the image; ``gate`` can hold an epoch."""

    def __init__(self, size=16):
        self.size, self.epochs, self.saved = size, 0, []
        self.gate = threading.Event()
        self.gate.set()
        self.rewards_seen = []
        self.reward_fn = None

    def step(self, epoch):
        self.gate.wait(10)
        images = torch.rand(2, 3, self.size, self.size)
        self.rewards_seen.append(self.reward_fn(images, ["p", "p"], [{"seed": 3}] * 2))
        self.epochs += 1
        return {"epoch": epoch, "reward_mean": float("nan"), "loss": torch.tensor(0.5)}

    def generate(self, prompts, seeds):
        return torch.full((len(prompts), 3, self.size, self.size), min(1.0, 0.1 * (self.epochs + 1)))

    def save_pretrained(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"stand-in")
        self.saved.append(folder)


def marks_png(size=16, liked_rows=slice(0, 8), disliked_rows=slice(8, 16)) -> bytes:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[liked_rows, :, 1] = 255
    rgba[liked_rows, :, 3] = 255
    rgba[disliked_rows, :, 0] = 255
    rgba[disliked_rows, :, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path):
    trainer = StandInTrainer()
    reward_fn = HumanFeedbackReward()
    trainer.reward_fn = reward_fn
    session = FeedbackSession(trainer, reward_fn, "a red circle", 3, tmp_path, epochs_per_round=2)
    server = start_server(session, "127.0.0.1", 0)
    yield server, session, trainer
    trainer.gate.set()
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    return answer.status, answer.getheader("Content-Type"), data


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = json.loads(request(server, "GET", "/api/state")[2])
        if state["status"] != "training":
            return state
        time.sleep(0.05)
    raise AssertionError("the round did not finish")


def test_page_and_static_files_are_served(served):
    server, _, _ = served
    status, kind, body = request(server, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="marks"' in body
    status, kind, _ = request(server, "GET", "/static/app.js")
    assert status == 200 and "javascript" in kind
    status, kind, body = request(server, "GET", "/api/image")
    assert status == 200 and kind == "image/png" and Image.open(io.BytesIO(body)).size == (16, 16)


@pytest.mark.parametrize("path", ["/static/../server.py", "/static/../../rewards/base.py", "/static/%2e%2e/server.py",
                                  "/static//etc/passwd", "/static/", "/server.py", "/etc/passwd"])
def test_nothing_outside_the_static_folder_is_served(served, path):
    status, _, body = request(served[0], "GET", path)
    assert status == 404 and b"import" not in body and b"root:" not in body


def test_a_round_trains_on_the_marks_and_shows_a_new_image(served):
    server, session, trainer = served
    before = request(server, "GET", "/api/image")[2]
    status, _, body = request(server, "POST", "/api/feedback", marks_png(), {"Content-Type": "image/png"})
    assert status == 202 and json.loads(body)["round"] == 1
    state = wait_idle(server)
    assert state["status"] == "idle" and state["image_version"] == 1 and state["progress"]["epoch"] == 2
    assert state["last_metrics"]["reward_mean"] is None and state["last_metrics"]["loss"] == 0.5  # JSON-safe
    assert request(server, "GET", "/api/image")[2] != before
    assert trainer.epochs == 2
    out = trainer.rewards_seen[-1]
    assert (out.reward[:, :8] == 1).all() and (out.reward[:, 8:] == -1).all() and (out.weight == 1).all()
    status, _, body = request(server, "POST", "/api/save", b"")
    assert status == 200 and (session.output_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads(body)["saved"] == str(session.output_dir / "lora")


def test_a_second_submission_while_training_is_refused(served):
    server, session, trainer = served
    trainer.gate.clear()
    assert request(server, "POST", "/api/feedback", marks_png(), {"Content-Type": "image/png"})[0] == 202
    status, _, body = request(server, "POST", "/api/feedback", marks_png(), {"Content-Type": "image/png"})
    assert status == 409 and "still training" in json.loads(body)["error"]
    assert request(server, "POST", "/api/save", b"")[0] == 409
    with pytest.raises(SessionBusy):
        session.save()
    trainer.gate.set()
    assert wait_idle(server)["round"] == 1


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (marks_png(size=32, liked_rows=slice(0, 16), disliked_rows=slice(16, 32)), {}, 400,
         "marks are 32x32 pixels but the image is 16x16"),
        (marks_png(disliked_rows=slice(0, 0)), {}, 400, "only liked regions are painted"),
        (marks_png(liked_rows=slice(0, 0), disliked_rows=slice(0, 0)), {}, 400, "nothing is painted"),
        (b"\x89PNG not really", {}, 400, "not a readable image"),
        (marks_png(), {"Content-Type": "application/json"}, 415, "image/png body"),
        (b"x", {"Content-Length": str(MAX_UPLOAD_BYTES + 1)}, 413, "over the"),  # refused before reading
        (marks_png(), {"Origin": "http://evil.example"}, 403, "cross-origin"),
        (marks_png(), {"Host": "evil.example"}, 403, "Host header"),
    ],
)
def test_bad_submissions_are_refused_with_a_reason(served, body, headers, status, message):
    server, session, trainer = served
    headers = {"Content-Type": "image/png", **headers}
    answer, _, payload = request(server, "POST", "/api/feedback", body, headers)
    assert answer == status and message in json.loads(payload)["error"]
    assert session.round == 0 and trainer.epochs == 0


def test_a_failing_round_is_reported_and_the_next_can_run(served):
    server, _, trainer = served
    trainer.step = lambda epoch: 1 / 0
    request(server, "POST", "/api/feedback", marks_png(), {"Content-Type": "image/png"})
    state = wait_idle(server)
    assert state["status"] == "error" and "ZeroDivisionError" in state["message"]
    del trainer.step  # back to the class's method
    assert request(server, "POST", "/api/feedback", marks_png(), {"Content-Type": "image/png"})[0] == 202
    assert wait_idle(server)["status"] == "idle"


# ------------------------------------------------------------------ the real trainer, a tiny model
TINY_TRAINING = {"sample_batch_size": 2, "sample_num_steps": 2, "train_learning_rate": 3e-2, "use_tensorboard": False}


def test_png_mask_route_trains_and_saves_a_lora_that_diffusers_loads(tiny_model, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from pxpo_ext.feedback.cli import main

    size = 16
    like = np.zeros((size, size), np.uint8)
    like[: size // 2] = 255
    Image.fromarray(like).save(tmp_path / "like.png")
    Image.fromarray(255 - like).save(tmp_path / "dislike.png")
    out = tmp_path / "run"
    main(["--model", tiny_model, "--prompt", "a red circle", "--seed", "5", "--like-mask", str(tmp_path / "like.png"),
          "--dislike-mask", str(tmp_path / "dislike.png"), "--epochs-per-round", "1", "--rounds", "2",
          "--sample-batch-size", "2", "--num-steps", "2", "--learning-rate", "3e-2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "round 2:" in printed and "saved the LoRA" in printed
    assert (out / "before.png").read_bytes() != (out / "after.png").read_bytes()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(out / "lora"))


def test_png_mask_route_refuses_masks_of_the_wrong_size(tiny_model, tmp_path):
    from pxpo_ext.feedback.cli import main

    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "like.png")
    with pytest.raises(SystemExit, match="marks are 8x8 pixels but the image is 16x16"):
        main(["--model", tiny_model, "--like-mask", str(tmp_path / "like.png"), "--num-steps", "2",
              "--output-dir", str(tmp_path / "run")])


def test_unreadable_masks_fail_before_any_model_loads(tmp_path, monkeypatch):
    from pxpo_ext.feedback import cli

    monkeypatch.setattr(cli, "create_session", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "like.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--like-mask .* is not a readable image"):
        cli.main(["--like-mask", str(tmp_path / "like.png")])
    with pytest.raises(SystemExit):
        cli.main(["--like-mask", str(tmp_path / "missing.png")])


# ------------------------------------------------------------------ the page in a real browser
def _count_painted(page) -> int:
    return page.evaluate("""() => {
        const c = document.getElementById('marks');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")


def _shown_image(page) -> list:
    return page.evaluate("""() => {
        const img = document.getElementById('image'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data); }""")


def _drag(page, box, y_fraction, x_from=0.02, x_to=0.98):
    y = box["y"] + y_fraction * box["height"]
    page.mouse.move(box["x"] + x_from * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + x_to * box["width"], y, steps=12)
    page.mouse.up()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install -y chromium")
def test_paint_submit_and_see_the_image_change_in_a_browser(tiny_model, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    session = create_session("a red circle", 3, model=tiny_model, output_dir=tmp_path, epochs_per_round=2,
                             **TINY_TRAINING)
    server = start_server(session, "127.0.0.1", 0)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-status='idle']")  # the first state is rendered
            page.wait_for_function("document.getElementById('image').complete && "
                                   "document.getElementById('image').naturalWidth === 16")
            assert page.inner_text("#prompt") == "a red circle"
            before = _shown_image(page)
            box = page.locator("#marks").bounding_box()

            page.fill("#brush-size", "6")  # range input; 6 image pixels = 192 screen pixels wide strokes
            page.dispatch_event("#brush-size", "input")
            page.check("#tool-like")
            _drag(page, box, 0.1)
            painted_once = _count_painted(page)
            assert painted_once > 0
            page.click("#undo")
            assert _count_painted(page) == 0
            for y in (0.1, 0.3):
                _drag(page, box, y)
            page.check("#tool-dislike")
            for y in (0.7, 0.9):
                _drag(page, box, y)
            page.check("#tool-erase")
            _drag(page, box, 0.9, x_from=0.75)  # erase the right end of the last stroke
            page.click("#submit")
            page.wait_for_selector("body[data-image-version='1'][data-status='idle']", timeout=180_000)
            assert "round 1 done" in page.inner_text("#status")
            page.wait_for_function("document.getElementById('image').complete")
            assert _shown_image(page) != before
            assert _count_painted(page) == 0  # the old marks were cleared with the old image

            marks = session.reward_fn
            top, bottom = marks.reward[:5], marks.reward[11:]
            assert (top[marks.weight[:5] > 0] > 0).all() and (bottom[marks.weight[11:] > 0] < 0).all()
            assert marks.weight[:5].mean() > 0.9 and marks.weight[14:, 14:].sum() == 0  # erased corner

            page.click("#save")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('saved the LoRA')")
            assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
