"""`python -m diffuse.demo ckpt=PATH [compare=PATH2] [port=7860]` — watch a checkpoint denoise, in the browser.

A Gradio page (the `[demo]` extra) on localhost: a prompt, the sampler and its knobs, Generate; the canvas is
streamed as the sampler runs (analysis/live.py runs it on a thread, sampling/trace.py records each step,
analysis/replay.py draws it), every token coloured by the step it was committed at; NFE, tokens per forward
pass and tokens/s; a slider scrubs the finished trajectory. `compare=PATH2` runs a second checkpoint (its own
sampler, e.g. AR with its KV cache) on the same prompt beside the first, each with its own timing.
Cancel stops a long generation at its next step. Only the checkpoints given at start can be chosen; a bad
knob value shows one line in the page, never a traceback.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import hydra
from omegaconf import DictConfig

from diffuse.analysis.live import Model, Run, load_model, sampler_from_knobs
from diffuse.analysis.replay import CSS, canvas_html, stats_line
from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors

CACHES = ("none", "prefix", "dual")
FRAME_S = 0.05  # at most 20 canvases a second go to the page


def knob_values(steps, span_length, threshold, gamma, temperature, top_p, cache) -> dict:
    """The page's knob boxes as sampler keywords: an empty box is None (the sampler's default); whole numbers
    where the sampler counts; `cache` none → null, and the block sampler's `use_cache` follows it."""

    def number(name, v):
        if v is None or str(v).strip() == "":
            return None
        try:
            return float(v)
        except ValueError:
            raise DiffuseError(f"{name}={v!r} must be a number (or empty: the sampler's default)") from None

    def whole(name, v):
        x = number(name, v)
        if x is not None and not (math.isfinite(x) and x == int(x)):  # int(inf) would raise OverflowError
            raise DiffuseError(f"{name}={v} must be a whole number")
        return None if x is None else int(x)

    if cache not in CACHES:
        raise DiffuseError(f"cache={cache!r} must be one of {', '.join(CACHES)}")
    return {"steps": whole("steps", steps), "span_length": whole("span_length", span_length),
            "threshold": number("threshold", threshold), "gamma": number("gamma", gamma),
            "temperature": number("temperature", temperature),
            "top_p": number("top_p", top_p),
            "cache": None if cache == "none" else cache, "use_cache": None if cache == "none" else True}


def default_length(model: Model) -> int:
    """48 tokens, or half the checkpoint's trained rows (data.seq_len) when that is less: room for a prompt."""
    seq_len = (model.cfg.get("data") or {}).get("seq_len")
    return min(48, int(seq_len) // 2) if seq_len else 48


def panel(model: Model, run: Run, prompt: str, upto: int | None = None) -> tuple[str, str]:
    """(stats line, canvas HTML) of a run after step `upto` (default: the last recorded)."""
    if not run.steps:
        return "…", ""
    i = len(run.steps) - 1 if upto is None else min(upto, len(run.steps) - 1)
    finished = run.output is not None and i == len(run.steps) - 1
    stats = stats_line(run.steps, i, model.special, seconds=run.seconds if finished else None)
    return f"**{os.path.basename(model.path)}** · {stats}", canvas_html(run.steps, 0, model.token, model.special, prompt, i)


def build_app(models: dict[str, Model], compare: Model | None = None):
    import gradio as gr  # the [demo] extra: only this command needs it

    first = next(iter(models.values()))
    with gr.Blocks(title="diffuse — watch it denoise") as app:
        gr.Markdown("## diffuse — watch it denoise\nEach token is coloured by the step it was committed at "
                    "(blue early → red late); ▒ = still masked, hatched = noise, outlined = written on this step.")
        with gr.Row():
            ckpt = gr.Dropdown(list(models), value=first.path, label="checkpoint", allow_custom_value=True)
            sampler = gr.Dropdown(first.sampler_names(), value=first.own_sampler(), label="sampler",
                                  allow_custom_value=True)
        prompt = gr.Textbox(label="prompt", value="Once upon a time", lines=2)
        with gr.Row():
            length = gr.Number(value=default_length(first), label="length", precision=0)
            # text boxes: empty means the sampler's own default (a number box cannot be empty)
            steps, span, threshold, gamma, temperature, top_p = (
                gr.Textbox(value="", placeholder="default", label=label, max_lines=1)
                for label in ("steps", "span / block length", "threshold", "entropy bound γ", "temperature", "top-p"))
            cache = gr.Dropdown(list(CACHES), value="none", label="cache")
            seed = gr.Number(value=0, label="seed", precision=0)
        with gr.Row():
            go = gr.Button("Generate", variant="primary")
            stop = gr.Button("Cancel")
        status = gr.Markdown("")
        with gr.Row():
            with gr.Column():
                stats_a, canvas_a = gr.Markdown(""), gr.HTML("")
            with gr.Column(visible=compare is not None):
                stats_b, canvas_b = gr.Markdown(""), gr.HTML("")
        scrub = gr.Slider(0, 1, value=0, step=1, label="scrub the trajectory (step)", interactive=True)
        runs = gr.State(None)

        async def generate(ckpt_path, prompt_text, sampler_name, n, s, sp, th, g, temp, tp, c, seed_value):
            outputs = [""] * 5 + [gr.Slider(), None]
            try:
                model = models.get(ckpt_path)
                if model is None:
                    raise DiffuseError(f"checkpoint {ckpt_path!r} was not given at start; choose one of {list(models)}")
                knobs = knob_values(s, sp, th, g, temp, tp, c)
                length_n = int(n) if n not in (None, "") and float(n) == int(float(n)) else None
                if not length_n or length_n <= 0:
                    raise DiffuseError(f"length={n} must be a positive whole number")
                seed_n = int(seed_value or 0)
                ids = model.tokenizer(prompt_text or "", add_special_tokens=False)["input_ids"]
                pairs = [(model, Run(model, sampler_from_knobs(model, sampler_name, knobs), ids, length_n, seed_n))]
                if compare is not None:
                    ids_b = compare.tokenizer(prompt_text or "", add_special_tokens=False)["input_ids"]
                    own = {k: v for k, v in knobs.items() if k in ("temperature", "top_p")}
                    pairs.append((compare, Run(compare, sampler_from_knobs(compare, compare.own_sampler(), own), ids_b,
                                               length_n, seed_n)))
            except (DiffuseError, ValueError, TypeError) as e:
                outputs[4] = f"⚠ {e}"
                yield outputs
                return
            for slot, (model, run) in enumerate(pairs):
                run.start()
                shown = 0.0
                try:
                    while True:
                        item = await asyncio.to_thread(run.next)
                        if item is None or item is not run and time.monotonic() - shown < FRAME_S:
                            continue  # steps faster than frames: the next frame shows the latest canvas
                        outputs[2 * slot: 2 * slot + 2] = panel(model, run, prompt_text)
                        if item is run:
                            break
                        yield outputs
                        shown = time.monotonic()
                finally:
                    run.cancel()  # the page went away or Cancel was pressed: the sampler stops at its next step
                if run.error:
                    outputs[4] = f"⚠ {run.error}"
                    yield outputs
                    return
            n_steps = max(len(r.steps) for _, r in pairs)
            outputs[4] = "done"
            outputs[5] = gr.Slider(0, max(n_steps - 1, 1), value=n_steps - 1, step=1)
            outputs[6] = [(m.path, r, prompt_text) for m, r in pairs]
            yield outputs

        def scrub_to(i, state):
            if not state:
                return "", "", "", ""
            out = ["", "", "", ""]
            for slot, (path, run, text) in enumerate(state):
                model = models.get(path) or compare
                out[2 * slot: 2 * slot + 2] = panel(model, run, text, int(i))
            return out

        inputs = [ckpt, prompt, sampler, length, steps, span, threshold, gamma, temperature, top_p, cache, seed]
        event = go.click(generate, inputs, [stats_a, canvas_a, stats_b, canvas_b, status, scrub, runs],
                         api_name="generate", concurrency_limit=1)
        stop.click(None, None, None, cancels=[event])  # a client's job.cancel() does the same
        scrub.change(scrub_to, [scrub, runs], [stats_a, canvas_a, stats_b, canvas_b], api_name="scrub")
        ckpt.change(lambda p: gr.Dropdown(models[p].sampler_names(), value=models[p].own_sampler())
                    if p in models else gr.Dropdown(), ckpt, sampler, api_name=False)
    return app


def launch(cfg: DictConfig, block: bool = True, models: dict[str, Model] | None = None, compare: Model | None = None):
    """Serve the page on cfg.host:cfg.port; `block=False` returns the running app. `models`/`compare`: already
    loaded checkpoints (tests), else cfg.ckpt and cfg.compare are loaded."""
    models = models or {str(cfg.ckpt): load_model(str(cfg.ckpt))}
    if compare is None and cfg.get("compare"):
        compare = load_model(str(cfg.compare))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: nothing phones home
    app = build_app(models, compare)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=cfg.host, server_port=cfg.port, css=CSS, prevent_thread_lock=not block,
               share=False, show_error=False)
    return app


@one_line_errors
def demo(cfg: DictConfig):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DiffuseError("diffuse.demo needs Gradio: pip install -e '.[demo]'") from None
    return launch(cfg, block=bool(cfg.get("block", True)))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
