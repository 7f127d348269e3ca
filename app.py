"""A local web page to look at the flow: draw digits on request, watch the noise travel along the ODE, and redraw a
digit as another class. A thin layer over the library (load_for_sampling, sample_model, the solvers, editing).

    make demo                                              # installs requirements-demo.txt, then opens the page
    python app.py [--port 7860] [--checkpoint PATH] [--one-step PATH] [--data-root data]

As a Hugging Face Space, the Space's README.md starts with this header (app.py and the repo's code beside it):

    ---
    title: Flow Image Generator
    sdk: gradio
    app_file: app.py
    ---
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall shared CPUs
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: nothing is sent anywhere

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from checkpoint import PRETRAINED, CheckpointError, load_checkpoint, mnist_checkpoint
from data import DataError, load_mnist, to_rgb
from editing import class_swap, inversion_sampler, psnr
from sampling import Loaded, load_for_sampling, sample_model, save_grid
from solvers import SOLVERS, Sampler, integrate, make_noise

OUT = Path(tempfile.mkdtemp(prefix="flow-demo-"))  # the page's images, served by Gradio from here
TRAJECTORY_ROWS = ("the flow", "straight line x0 -> x1", "one-step model")


class PageError(ValueError):
    """A request the page refuses, said in one line under the button."""


@functools.lru_cache(maxsize=4)
def loaded(path: str) -> Loaded:
    """A checkpoint or exported folder ready to sample (cached: a draw reads no file)."""
    if not path.strip():
        raise PageError("give a checkpoint: a .pth file or an exported folder")
    return load_for_sampling(path.strip(), device="cpu")


def number(text: str, name: str) -> float | None:
    """A number typed into the page (blank: None); PageError for text that is not one."""
    try:
        return float(text) if str(text).strip() else None
    except ValueError:
        raise PageError(f"{name} must be a number, got {text!r}") from None


def chosen_sampler(model: Loaded, solver: str, steps_text: str, guidance_text: str) -> Sampler:
    """The page's solver / steps / guidance over the checkpoint's recorded sampler ("recorded" or blank: keep it)."""
    steps, guidance = number(steps_text, "steps"), number(guidance_text, "guidance")
    if steps is not None and (not math.isfinite(steps) or steps != int(steps)):
        raise PageError(f"steps must be a whole number, got {steps_text}")
    return Sampler.recorded(model.record.sampler, None if solver == "recorded" else solver,
                            None if steps is None else int(steps), guidance)


def class_names(model: Loaded) -> list[str]:
    """The names of the model's classes: those its checkpoint records, else their indices (none: unconditional)."""
    return model.record.class_names or [str(i) for i in range(model.model.config.num_classes or 0)]


def class_indices(model: Loaded, names: list[str]) -> list[int]:
    """The model's class indices of the class names picked on the page."""
    known = class_names(model)
    if model.model.config.num_classes is not None and not names:
        raise PageError("pick at least one class")
    return [known.index(name) for name in names if name in known]


def draw(path: str, names: list[str], per_class: float, solver: str, steps: str, guidance: str,
         seed: float) -> tuple[str | None, str]:
    """The Draw tab: a grid of per_class digits of each class picked, and what drawing them cost."""
    model = loaded(path)
    sampler = chosen_sampler(model, solver, steps, guidance)
    classes, count = class_indices(model, names), int(per_class)
    labels = torch.tensor(classes).repeat_interleave(count) if model.model.config.num_classes is not None else None
    start = time.perf_counter()
    samples = sample_model(model.model, len(labels) if labels is not None else count, labels, sampler, int(seed))
    seconds = time.perf_counter() - start
    by_class = labels is not None and count > 1  # a row per class; one of each: a single row in class order
    grid = save_grid(samples.images, OUT / f"draw-{time.time_ns()}.png", samples.labels if by_class else None,
                     model.record.class_names, scale=3, ncol=None if by_class else len(samples.images))
    return str(grid), (f"{len(samples.images)} images, {sampler}: **{samples.nfe} NFE** per image, "
                       f"**{seconds:.2f} s** on {torch.get_num_threads()} CPU thread(s)")


def path_states(model: Loaded, noise: torch.Tensor, label: int | None, sampler: Sampler) -> torch.Tensor:
    """The states x_t (K + 1, C, H, W) along the sampler's grid from noise (1, C, H, W), the image last."""
    states, _ = integrate(model.model, noise, torch.tensor([label]) if label is not None else None, sampler,
                          states=True)
    return states[0]


def trajectory(path: str, one_step_path: str, name: str, seed: float) -> tuple[str, str]:
    """The Trajectory tab: one digit's path along the flow's solver steps, the straight line from its noise to its
    image at the same times, and the one-step model's jump from the same noise."""
    flow, jump = loaded(path), loaded(one_step_path)
    cfg, other = flow.model.config, jump.model.config
    if (cfg.in_channels, cfg.image_size, cfg.num_classes) != (other.in_channels, other.image_size, other.num_classes):
        raise PageError(f"the one-step model draws {other.in_channels}x{other.image_size} px images of "
                        f"{other.num_classes} classes, the flow {cfg.in_channels}x{cfg.image_size} of "
                        f"{cfg.num_classes}: give a one-step model of the same data")
    label = class_indices(flow, [name])[0] if cfg.num_classes is not None else None
    noise = make_noise(1, (cfg.in_channels, cfg.image_size, cfg.image_size), int(seed), "cpu")
    along = path_states(flow, noise, label, flow.sampler)
    t = torch.linspace(0, 1, len(along)).view(-1, 1, 1, 1)
    rows = [along, (1 - t) * noise + t * along[-1:], path_states(jump, noise, label, jump.sampler)]
    labels = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)])
    grid = save_grid((torch.cat(rows).clamp(-1, 1) + 1) / 2, OUT / f"path-{time.time_ns()}.png", labels,
                     list(TRAJECTORY_ROWS), scale=3)
    return str(grid), (f"the flow: {flow.sampler}; the one-step model: {jump.sampler}. Columns are the solvers' "
                       "times, from t = 0 (the noise) to t = 1 (the image).")


def source_digit(model: Loaded, data_root: str, index: float | None, upload: Image.Image | None
                 ) -> torch.Tensor:
    """The image to edit (1, C, H, W) in [0, 1]: an upload or drawing (dark on light is inverted: MNIST is light
    on dark), else test digit `index` of MNIST under data_root."""
    cfg = model.model.config
    if upload is not None:
        im = to_rgb(upload).convert("L" if cfg.in_channels == 1 else "RGB").resize((cfg.image_size, cfg.image_size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).view(cfg.image_size, cfg.image_size, -1)
        x = x.permute(2, 0, 1)
        return (1 - x if cfg.in_channels == 1 and x.mean() > 0.5 else x)[None]
    if index is None or not math.isfinite(index) or index < 0:
        raise PageError("pick a test digit (an index from 0), or upload or draw an image")
    try:
        digits = load_mnist(data_root, train=False, image_size=cfg.image_size, download=False)
    except DataError as e:
        raise PageError(f"no MNIST test digits here ({e}): upload an image, or start the page with --data-root"
                        ) from None
    if int(index) >= len(digits):
        raise PageError(f"test digit {int(index)} is out of range: there are {len(digits)}")
    return (digits[int(index)][0][None] + 1) / 2


def drawn(sketch: dict | None) -> Image.Image | None:
    """The digit drawn on the page's sketch pad (its composite image), or None while the pad is blank."""
    image = (sketch or {}).get("composite")
    return image if image is not None and np.asarray(to_rgb(image).convert("L")).min() < 250 else None


def edit(path: str, data_root: str, index: float | None, upload: Image.Image | None, sketch: dict | None,
         own: str, targets: list[str]) -> tuple[str, str]:
    """The Edit tab: the image, its reconstruction from its inverted noise, and that noise redrawn as each target."""
    model = loaded(path)
    if model.model.config.num_classes is None:
        raise PageError("class swap needs a class-conditional model: this one is unconditional")
    image = source_digit(model, data_root, index, upload if upload is not None else drawn(sketch))
    label = torch.tensor(class_indices(model, [own]))
    goals = torch.tensor(class_indices(model, targets))
    sampler = inversion_sampler(model, None, None)
    # its own class first: the image redrawn from its inverted noise is its reconstruction
    back, *swapped = class_swap(model.model, image, label, torch.cat([label, goals]), sampler)[0].split(1)
    grid = save_grid(torch.cat([image, back, *swapped]), OUT / f"edit-{time.time_ns()}.png", ncol=len(goals) + 2,
                     scale=4)
    names = class_names(model)
    return str(grid), (f"the image, its reconstruction ({psnr(back, image).item():.1f} dB), then redrawn as "
                       f"{', '.join(names[i] for i in goals.tolist())} ({sampler}; inverted at w = 1)")


def safely(fn):
    """A handler whose refusals (bad input, a checkpoint that does not load) become one line on the page."""
    @functools.wraps(fn)
    def handler(*args):
        try:
            return fn(*args)
        except (PageError, ValueError, CheckpointError, DataError, UnidentifiedImageError, OSError) as e:
            return None, f"**error:** {e}"
    return handler


def page(checkpoint: str, one_step: str, data_root: str) -> gr.Blocks:
    """The page: Draw, Trajectory and Edit tabs over the checkpoint given on the command line."""
    first = loaded(checkpoint)
    names = class_names(first)
    with gr.Blocks(title="Flow Image Generator") as blocks:
        gr.Markdown("# Flow Image Generator\nRectified flow: noise at t = 0, images at t = 1. Every draw runs on "
                    "this machine's CPU.")
        path = gr.Textbox(checkpoint, label="checkpoint (a .pth file or an exported folder)", elem_id="checkpoint")
        with gr.Tab("Draw"):
            with gr.Row():
                classes = gr.CheckboxGroup(names, value=names, label="classes", elem_id="draw-classes")
                per_class = gr.Slider(1, 10, value=1, step=1, label="per class", elem_id="draw-count")
            with gr.Row():
                solver = gr.Dropdown(["recorded", *SOLVERS], value="recorded", label="solver", elem_id="draw-solver")
                steps = gr.Textbox("", label="steps (blank: recorded)", elem_id="draw-steps")
                guidance = gr.Textbox("", label="guidance w (blank: recorded)", elem_id="draw-guidance")
                seed = gr.Number(0, label="seed", precision=0, elem_id="draw-seed")
            button = gr.Button("Draw", variant="primary", elem_id="draw-button")
            info = gr.Markdown(elem_id="draw-info")
            image = gr.Image(label="samples", type="filepath", elem_id="draw-image")
            button.click(safely(draw), [path, classes, per_class, solver, steps, guidance, seed], [image, info])
        with gr.Tab("Trajectory"):
            with gr.Row():
                other = gr.Textbox(one_step, label="one-step model", elem_id="path-one-step")
                digit = gr.Dropdown(names, value=names[0] if names else None, label="class", elem_id="path-class")
                path_seed = gr.Number(0, label="seed", precision=0, elem_id="path-seed")
            path_button = gr.Button("Show the path", variant="primary", elem_id="path-button")
            path_info = gr.Markdown(elem_id="path-info")
            path_image = gr.Image(label="x_t along the ODE", type="filepath", elem_id="path-image")
            path_button.click(safely(trajectory), [path, other, digit, path_seed], [path_image, path_info])
        with gr.Tab("Edit"):
            with gr.Row():
                index = gr.Number(0, label="MNIST test digit", precision=0, elem_id="edit-index")
                upload = gr.Image(label="or an image of yours", type="pil", sources=["upload", "clipboard"],
                                  elem_id="edit-upload")
                sketch = gr.Sketchpad(label="or draw one", type="pil", elem_id="edit-sketch")
                own = gr.Dropdown(names, value=names[0] if names else None, label="its class", elem_id="edit-own")
            targets = gr.CheckboxGroup(names, value=names, label="redraw as", elem_id="edit-targets")
            edit_button = gr.Button("Invert and redraw", variant="primary", elem_id="edit-button")
            edit_info = gr.Markdown(elem_id="edit-info")
            edit_image = gr.Image(label="image, reconstruction, redrawn", type="filepath", elem_id="edit-image")
            root = gr.State(data_root)
            edit_button.click(safely(edit), [path, root, index, upload, sketch, own, targets],
                              [edit_image, edit_info])
    return blocks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint or exported folder to draw from (default: make "
                   "train's, else the committed pretrained/mnist-1rf)")
    p.add_argument("--one-step", default=os.path.relpath(PRETRAINED / "mnist-meanflow"),
                   help="the one-step model shown beside the flow's path (default: %(default)s)")
    p.add_argument("--data-root", default="data", help="folder holding MNIST/raw, for test digits to edit")
    p.add_argument("--port", type=int, default=7860, help="local port (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must lie in 0..65535 (0: any free one), got {args.port}")
    load_checkpoint(args.one_step)  # the one-step model beside the flow's path: refused here, not on the page
    checkpoint, note = mnist_checkpoint(args.checkpoint)
    if note:
        print(note)
    try:
        blocks = page(os.path.relpath(checkpoint), args.one_step, args.data_root)
    except (CheckpointError, ValueError) as e:
        p.error(str(e))
    print(f"the page: http://{args.host}:{args.port}", flush=True)
    blocks.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(OUT)], show_error=True)


if __name__ == "__main__":
    main()
