"""diffuse.demo driven as a person would, through gradio_client on a free localhost port: generate (a streamed,
finished canvas with NFE and tokens per forward), compare (a second checkpoint beside it), a bad knob value and a
checkpoint not given at start (one visible line each), cancel (the sampler stops at its next step); the renderer
and the trace= files of diffuse.sample. The browser test is tests/test_demo_browser.py."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from conftest import SPECIAL, call_main, tiny_transformer
from omegaconf import OmegaConf

gradio_client = pytest.importorskip("gradio_client", reason="the [demo] extra (gradio) is not installed")

from diffuse.analysis.live import load_model
from diffuse.analysis.replay import canvas_html, cells, page_html
from diffuse.demo import launch
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.sampling.llada import LLaDASampler
from diffuse.sampling.trace import recording
from diffuse.schedules import build_schedule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slow:
    """Wraps a backbone's forward with a pause while `delay` > 0: a generation long enough to cancel."""

    def __init__(self, backbone):
        self.delay, self.calls, self.inner = 0.0, 0, backbone.forward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def demo(debug_run):
    import gradio as gr

    ckpt = str(debug_run / "checkpoints" / "last.ckpt")
    model = load_model(ckpt)
    slow = model.module.backbone.forward = Slow(model.module.backbone)
    cfg = OmegaConf.load("conf/demo.yaml")
    cfg.ckpt, cfg.port = ckpt, free_port()
    launch(cfg, block=False, models={ckpt: model}, compare=load_model(ckpt))
    client = gradio_client.Client(f"http://127.0.0.1:{cfg.port}/", verbose=False)
    yield client, ckpt, slow, cfg.port
    gr.close_all()


def ask(client, ckpt, prompt="The", sampler="llada", length=12, steps="6", span="", threshold="", gamma="",
        temperature="", top_p="", cache="none", seed=0):
    return client.predict(ckpt, prompt, sampler, length, steps, span, threshold, gamma, temperature, top_p, cache, seed,
                          api_name="/generate")


def test_generate_and_compare_show_the_finished_canvases_with_their_costs(demo):
    client, ckpt, _, port = demo
    stats_a, canvas_a, stats_b, canvas_b, status, scrub = ask(client, ckpt)
    assert status == "done"
    assert "step 6/6" in stats_a and "NFE 6" in stats_a and "tokens per forward" in stats_a and "tokens/s" in stats_a
    assert 'class="dl-canvas"' in canvas_a and "▒" not in canvas_a  # every mask filled at the end
    assert canvas_a.count("<span") == 1 + 12  # the prompt, then one cell per generated token
    assert "NFE" in stats_b and 'class="dl-canvas"' in canvas_b  # compare=: the second checkpoint beside it
    assert scrub["maximum"] >= 5
    early_stats, early, *_ = client.predict(0, api_name="/scrub")  # the slider replays the trajectory
    assert "step 1/6" in early_stats and early.count("▒") == 12 - 2  # 12 tokens in 6 steps: 2 committed on the first
    with socket.create_connection(("127.0.0.1", port)):  # served on localhost
        pass


@pytest.mark.parametrize("knob, message", [({"steps": "-3"}, "sampler.steps=-3 must be positive"),
                                           ({"top_p": "1.5"}, "top_p=1.5 must lie in (0, 1]"),
                                           ({"temperature": "hot"}, "temperature='hot' must be a number"),
                                           ({"steps": "2.5"}, "steps=2.5 must be a whole number"),
                                           ({"span": "inf"}, "span_length=inf must be a whole number"),
                                           ({"sampler": "eb", "gamma": "-1"}, "gamma=-1"),
                                           ({"length": 0}, "length=0 must be a positive whole number"),
                                           ({"sampler": "ddim"}, "sampler=ddim does not decode this checkpoint"),
                                           ({"ckpt": "/etc/passwd"}, "was not given at start")])
def test_a_bad_value_is_one_visible_line(demo, knob, message):
    client, ckpt, _, _ = demo
    kwargs = {"ckpt": ckpt, **knob}
    *_, status, _ = ask(client, **kwargs)
    assert status.startswith("⚠") and message in status and "Traceback" not in status and "\n" not in status


def test_cancel_stops_the_sampler_at_its_next_step(demo):
    client, ckpt, slow, _ = demo
    slow.delay, before = 0.15, slow.calls
    try:
        job = client.submit(ckpt, "The", "llada", 24, "24", "", "", "", "", "", "none", 0, api_name="/generate")
        deadline = time.time() + 30
        while not job.outputs() and time.time() < deadline:  # the canvas is streamed while the sampler runs
            time.sleep(0.05)
        streamed = job.outputs()[-1][1]
        assert 'class="dl-canvas"' in streamed and "▒" in streamed  # a canvas with masks left: mid-generation
        job.cancel()  # what the page's Cancel button does: the server cancels the event
        time.sleep(0.6)
        stopped = slow.calls
        time.sleep(0.6)
        assert slow.calls == stopped < before + 24  # no more forward passes: it stopped well before its 24
    finally:
        slow.delay = 0.0
    *_, status, _ = ask(client, ckpt)  # and the page still answers
    assert status == "done"


def test_the_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    out = call_main("diffuse.demo", f"ckpt={tmp_path}/none.ckpt", "block=false", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "none.ckpt" in out.stderr and "Traceback" not in out.stderr


def test_the_renderer_colours_by_commit_step_and_the_page_is_self_contained():
    sampler = LLaDASampler(steps=4, span_length=None)
    with recording(sampler) as traj:
        sampler.generate(tiny_transformer(), MaskedDiscrete(build_schedule("linear"), SPECIAL), [[1, 2]], 4, seed=0)
    token = lambda i: f"<{i}>"
    first, last = cells(traj.steps, 0, token, SPECIAL, 0), cells(traj.steps, 0, token, SPECIAL)
    assert [c.kind for c in first].count("mask") == 3 and sum(c.new for c in first) == 1
    assert sorted(c.step for c in last) == [0, 1, 2, 3]  # one token per step, each coloured by its own step
    assert all(c.confidence > 0 for c in last) and not any(c.revised for c in last)
    assert "&lt;" in canvas_html(traj.steps, 0, token, SPECIAL, "a<b") and "<b" not in canvas_html(
        traj.steps, 0, token, SPECIAL, "a<b").replace("<b>", "")
    page = page_html(traj.steps, [0], token, SPECIAL, ["p"])
    assert "http" not in page and page.count("dl-canvas\\") >= 4  # four frames inlined, nothing fetched


def test_a_revision_and_renoised_noise_are_drawn_as_such():
    """A uniform-state style trajectory written through the hook: position 0 committed twice (revised), position 1
    renoised and never committed (noise), position 2 still masked."""
    from diffuse.sampling.trace import Recorder

    rec = Recorder()
    rec.step(torch.tensor([[5, 6, SPECIAL.mask]]), nfe=1, committed=torch.tensor([[True, False, False]]),
             renoised=torch.tensor([[False, True, False]]))
    rec.step(torch.tensor([[7, 8, SPECIAL.mask]]), nfe=2, committed=torch.tensor([[True, False, False]]),
             renoised=torch.tensor([[False, True, False]]))
    c = cells(rec.trajectory.steps, 0, str, SPECIAL)
    assert [x.kind for x in c] == ["token", "noise", "mask"] and [x.text for x in c[:2]] == ["7", "8"]
    assert c[0].revised and c[0].step == 1 and c[0].new and not c[1].new
    html = canvas_html(rec.trajectory.steps, 0, str, SPECIAL)
    assert "dl-revised" in html and "dl-noise" in html and "dl-mask" in html


def test_sample_writes_an_html_replay_and_a_gif(debug_run, tmp_path):
    from PIL import Image

    ckpt = debug_run / "checkpoints" / "last.ckpt"
    for name in ("t.html", "t.gif"):
        out = call_main("diffuse.sample", f"ckpt={ckpt}", "num_samples=2", "length=8", "steps=4", "prompt=The",
                        f"trace={tmp_path / name}", f"hydra.run.dir={tmp_path}")
        assert out.returncode == 0, out
    page = (tmp_path / "t.html").read_text()
    assert "<script" in page and "src=" not in page and "http" not in page  # self-contained
    assert page.count('class=\\"dl-canvas\\"') == 2 * 4  # two samples, four steps
    gif = Image.open(tmp_path / "t.gif")
    assert gif.n_frames == 4
    bad = call_main("diffuse.sample", f"ckpt={ckpt}", "trace=out.txt", f"hydra.run.dir={tmp_path}")
    assert bad.returncode != 0 and "trace=out.txt must be" in bad.stderr


# -- the page in a real browser ------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: no extra package)."""

    def __init__(self, exe: str, profile):
        import os
        import subprocess

        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', exe, "--headless=new", "--remote-debugging-pipe",
             "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1100",
             "about:blank"], pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, **params):
        import json
        import os

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from, 1 << 16)
                assert chunk, "chromium closed its pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply.get("result", {})

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(expression):
                return True
            time.sleep(0.2)
        raise AssertionError(f"the page never satisfied {expression}")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def test_in_a_browser_a_prompt_and_generate_end_on_the_final_canvas(demo, tmp_path):
    import base64
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium): the browser test is skipped")
    _, _, _, port = demo
    browser = Chromium(exe, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url=f"http://127.0.0.1:{port}/")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.wait_for("document.querySelector('textarea') !== null")
        browser.js("const t = document.querySelector('textarea'); t.focus(); t.select(); true")
        browser.send("Input.insertText", text="Once upon a time")  # typed, as a person would
        browser.js("[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Generate').click()")
        shot = tmp_path / "demo.png"
        try:
            browser.wait_for("document.body.innerText.includes('done') && document.querySelector('.dl-canvas') !== null")
        finally:  # the screenshot shows what went wrong too
            shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
        canvas = browser.js("document.querySelector('.dl-canvas').innerText")
        stats = browser.js("document.body.innerText")
    finally:
        browser.close()
    assert canvas.startswith("Once upon a time") and "▒" not in canvas  # the prompt, then every mask filled
    assert "NFE" in stats and "tokens per forward" in stats
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
