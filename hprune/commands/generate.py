"""Generate images with a compressed model: prompts -> PNGs and a contact sheet.

MODEL is one of
  - a diffusers pipeline folder: the base model's with --artifact, or one written by
    save_compressed(..., as_pipeline=...) (its transformer is the artifact);
  - a built-in tiny model (tiny-sd3, tiny-sd35, tiny-flux: seeded weights and a tiny VAE, prompts
    become seeded stand-in embeddings), with --artifact for one compressed from it;
  - shapes-teacher (the ShapesBench teacher: prompts are its captions, e.g. "a red circle"), with
    --artifact for one compressed from it;
  - an artifact (or the folder `hprune compress` wrote) compressed from a built-in model.
--compare puts the original and the compressed model side by side from the same noise (needs the
original: a base pipeline folder or a built-in). Image i uses seed + i.

Writes OUT/compressed/NNN.png (OUT/original/NNN.png with --compare, or alone for a built-in
without --artifact) and OUT/contact_sheet.png.

examples:
  hprune generate ./sd35-large --artifact out/ --prompt "a fox in the snow" --compare --out imgs
  hprune generate ./sd35-large-hp30 --prompts prompts.txt --lora style.safetensors:0.8 --out imgs
  hprune generate shapes-teacher --artifact sd-hp20 --prompt "a red circle" --compare --out imgs"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from hprune.commands import add_device_arguments, check_size

HELP = "prompts -> images (PNGs and a contact sheet), optionally next to the original and with LoRAs"
TINY_STEPS, PIPELINE_STEPS = 8, 28
MAX_STEPS = 1000  # the flow-matching schedulers' training timesteps: more steps revisit the same ones
MAX_SIZE = 16384  # pixels; the model's own bound (position embeddings, latent grid) is checked later
MAX_SEED = 2**63 - 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="pipeline folder, built-in model, or artifact (see above)")
    p.add_argument("--artifact", help="the compressed transformer (artifact, `hprune compress` output, or a "
                                      "compressed pipeline folder)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file of prompts, one per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--compare", action="store_true", help="also generate with the original model, same noise")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA made for the original model (repeatable; scale default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i: seed + i)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: {PIPELINE_STEPS} for pipelines, {TINY_STEPS} for tiny models, "
                        f"20 for shapes-teacher)")
    p.add_argument("--size", type=int, default=None, help="image height = width in pixels (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    add_device_arguments(p)
    p.add_argument("--overwrite", action="store_true")


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale)."""
    from hprune.errors import HpruneError

    import math

    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            scale = None
        if scale is not None:
            if not math.isfinite(scale):
                raise HpruneError(f"--lora {spec}: the scale must be a finite number, got {scale}")
            return path, scale
    if not spec:
        raise HpruneError("--lora: empty path")
    return spec, 1.0


def lora_title(loras: list[tuple[str, float]]) -> str | None:
    """The contact sheet's title line: which LoRAs, at which scale (None without any)."""
    from pathlib import Path

    if not loras:
        return None
    return "LoRA: " + ", ".join(f"{Path(path).name} × {scale:g}" for path, scale in loras)


def run(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from hprune.commands import device_and_dtype, read_prompts
    from hprune.errors import HpruneError
    from hprune.io import atomic_dir, check_output
    from hprune.plots import image_grid
    from hprune.report import tqdm

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise HpruneError("give at least one --prompt or a --prompts file")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise HpruneError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if args.size is not None and not 8 <= args.size <= MAX_SIZE:
        raise HpruneError(f"--size must be between 8 and {MAX_SIZE} pixels, got {args.size}")
    if not 0 <= args.seed <= MAX_SEED - len(prompts):
        raise HpruneError(f"--seed must be between 0 and {MAX_SEED - len(prompts)} (image i uses seed + i), "
                          f"got {args.seed}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise HpruneError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    loras = [parse_lora(s) for s in args.lora]
    for path, _ in loras:
        if not Path(path).exists():
            raise HpruneError(f"--lora: not found: {path}")
    check_output(args.out, args.overwrite)
    device, dtype = device_and_dtype(args)
    makers = _image_makers(args, device, dtype)  # {"original"?: fn, "compressed": fn}
    if loras:
        for label, maker in makers.items():
            for i, (path, scale) in enumerate(loras):
                print(f"{label}: {maker.apply_lora(path, scale, f'lora{i}')}")
    images: dict[str, list[Any]] = {label: [] for label in makers}
    bar = tqdm(total=len(prompts) * len(makers), desc="images", unit="img")
    for i, prompt in enumerate(prompts):
        for label, maker in makers.items():
            images[label].append(maker(prompt, args.seed + i))
            bar.update(1)
    bar.close()
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        for label, imgs in images.items():
            (tmp / label).mkdir()
            for i, img in enumerate(imgs):
                _save_png(img, tmp / label / f"{i:03d}.png")
        (tmp / "prompts.txt").write_text("".join(f"{i:03d}\t{p}\n" for i, p in enumerate(prompts)))
        rows = {label: torch_cat(imgs) for label, imgs in images.items()}
        image_grid(rows, tmp / "contact_sheet.png", col_labels=[p[:24] for p in prompts], title=lora_title(loras))
    print(f"wrote {len(prompts) * len(makers)} images and contact_sheet.png to {args.out}")
    return 0


def torch_cat(imgs: list[Any]) -> Any:
    import torch

    return torch.cat(imgs)


def _save_png(img: Any, path: Any) -> None:
    """img (1, 3, H, W) float in [0, 1] -> 8-bit RGB PNG."""
    from PIL import Image

    arr = (img[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(path)


class _Maker:
    """Makes one image (1, 3, H, W) in [0, 1] for (prompt, seed) with one transformer."""

    def __init__(self, fn: Callable[[str, int], Any], transformer: Any, pipe: Any = None) -> None:
        self.fn, self.transformer, self.pipe = fn, transformer, pipe

    def __call__(self, prompt: str, seed: int) -> Any:
        return self.fn(prompt, seed)

    def apply_lora(self, path: str, scale: float, name: str) -> Any:
        import warnings

        from hprune.lora import apply_lora

        with warnings.catch_warnings():  # the report is printed instead
            warnings.simplefilter("ignore", UserWarning)
            return apply_lora(self.transformer, path, scale=scale, adapter_name=name)


def _image_makers(args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, _Maker]:
    from pathlib import Path

    from hprune.artifacts import PIPELINE_INDEX, find_artifact, read_recipe
    from hprune.errors import HpruneError
    from hprune.models.registry import BUILTINS

    spec = args.model
    if spec in BUILTINS:
        if not BUILTINS[spec].tiny:
            raise HpruneError(f"{spec} is an architecture without weights here; give its diffusers pipeline folder")
        return _builtin_makers(args, spec, args.artifact, device, dtype)
    p = Path(spec)
    if not p.exists():
        raise HpruneError(f"MODEL not found: {spec} (a pipeline folder, a built-in name: "
                          f"{', '.join(n for n, b in BUILTINS.items() if b.tiny)}, or an artifact)")
    if (p / PIPELINE_INDEX).is_file():
        return _pipeline_makers(args, p, device, dtype)
    if args.artifact:
        raise HpruneError(f"{spec}: with --artifact, MODEL is the base: a pipeline folder or a built-in name")
    art = find_artifact(p)
    doc = read_recipe(art)
    name = _builtin_base(doc)
    if name is None:
        raise HpruneError(f"{spec}: this artifact was not compressed from a built-in model; give the base "
                          f"pipeline folder: hprune generate BASE --artifact {spec}")
    return _builtin_makers(args, name, str(art), device, dtype)


def _builtin_base(doc: dict[str, Any]) -> str | None:
    """The built-in tiny model an artifact was compressed from (same class and config), or None."""
    import json

    from hprune.models.registry import BUILTINS, build_from_config, model_config

    for name, b in BUILTINS.items():
        if not b.tiny or b.class_name != doc["class_name"]:
            continue
        want = {k: v for k, v in model_config(build_from_config(b.class_name, b.config, meta=True)).items()
                if not k.startswith("_")}
        got = {k: v for k, v in doc["base_config"].items() if not k.startswith("_")}
        if json.dumps(want, sort_keys=True) == json.dumps(got, sort_keys=True):
            return name
    return None


def _builtin_makers(args: argparse.Namespace, name: str, artifact: str | None, device: Any, dtype: Any
                    ) -> dict[str, _Maker]:
    from hprune.artifacts import load_compressed
    from hprune.errors import HpruneError
    from hprune.loading import load_model

    if artifact is None and args.compare:
        raise HpruneError("--compare needs a compressed model: add --artifact")
    if artifact is not None:  # an artifact of another model would run "from the same noise", silently wrong
        from hprune.artifacts import find_artifact, read_recipe

        base = _builtin_base(read_recipe(find_artifact(artifact)))
        if base != name:
            raise HpruneError(f"--artifact {artifact} was compressed from "
                              f"{base or 'a model that is not a built-in'}, not {name}; give the model it was "
                              f"compressed from")
    compressed = (load_compressed(artifact, device=device, dtype=dtype) if artifact
                  else load_model(name, device=device, dtype=dtype))
    models = {"compressed" if artifact else "original": compressed}
    if args.compare:
        models = {"original": load_model(name, device=device, dtype=dtype), "compressed": compressed}
    if name == "shapes-teacher":
        return {label: _shapes_maker(args, m) for label, m in models.items()}
    return {label: _tiny_maker(args, m) for label, m in models.items()}


def _tiny_maker(args: argparse.Namespace, model: Any, pipe: Any = None) -> _Maker:
    import zlib

    from hprune.pipelines import build_pipeline, generate, stand_in_prompts

    pipe = pipe if pipe is not None else build_pipeline(model)
    steps = args.steps or TINY_STEPS
    check_size(pipe, args.size)

    def make(prompt: str, seed: int) -> Any:
        emb = stand_in_prompts(model, 1, seed=zlib.crc32(prompt.encode()))  # the same text, the same embedding
        return generate(pipe, **emb, steps=steps, seed=seed, height=args.size, width=args.size,
                        guidance_scale=args.guidance or 1.0)

    return _Maker(make, model, pipe)


def _shapes_maker(args: argparse.Namespace, model: Any) -> _Maker:
    from hprune.errors import HpruneError
    from hprune.shapes.checkpoint import default_guidance, is_caption, load_text_encoder
    from hprune.shapes.sample import noise_for, sample, to_image
    from hprune.shapes.text import encode_captions

    size = model.config.sample_size
    if args.size not in (None, size):
        raise HpruneError(f"the ShapesBench teacher makes {size}x{size} images (--size {args.size})")
    p = next(model.parameters())
    encoder = load_text_encoder(device=p.device)
    guidance = args.guidance if args.guidance is not None else default_guidance()
    steps = args.steps or 20

    def make(prompt: str, seed: int) -> Any:
        if not is_caption(prompt):
            raise HpruneError(f"{prompt!r} is not a ShapesBench caption (e.g. 'a red circle', "
                              f"'two small blue squares')")
        enc, pooled = encode_captions(encoder, [prompt])
        x = sample(model, enc, pooled, noise_for(1, seed, size, model.config.in_channels), steps=steps,
                   guidance=guidance)
        return to_image(x)

    return _Maker(make, model)


def _pipeline_makers(args: argparse.Namespace, folder: Any, device: Any, dtype: Any) -> dict[str, _Maker]:
    from hprune.errors import HpruneError
    from hprune.loading import load_pipeline, open_pipeline

    compressed_pipe = (folder / "transformer" / "hprune.json").is_file()
    if args.compare and (compressed_pipe or not args.artifact):
        raise HpruneError("--compare needs the original: MODEL = the base pipeline folder, with --artifact")
    if not compressed_pipe and not args.artifact:
        raise HpruneError(f"{folder}: its transformer is not compressed; add --artifact (or use `hprune generate` "
                          f"on a pipeline written with save_compressed(..., as_pipeline=...))")
    pipes = {"compressed": load_pipeline(folder, args.artifact, device=device, dtype=dtype)}
    if args.compare:
        pipes = {"original": open_pipeline(folder, device=device, dtype=dtype), **pipes}
    return {label: _pipeline_maker(args, pipe, device) for label, pipe in pipes.items()}


def _pipeline_maker(args: argparse.Namespace, pipe: Any, device: Any) -> _Maker:
    import torch

    pipe.set_progress_bar_config(disable=True)
    check_size(pipe, args.size)
    kw: dict[str, Any] = {"num_inference_steps": args.steps or PIPELINE_STEPS, "output_type": "pt"}
    if args.size:
        kw["height"] = kw["width"] = args.size
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance

    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
        # a pipeline saved without text encoders (tiny test pipelines): stand-in prompt embeddings
        tiny = _tiny_maker(args, pipe.transformer, pipe)
        return tiny

    def make(prompt: str, seed: int) -> Any:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(prompt=prompt, generator=gen, **kw).images.float().clamp(0, 1).cpu()

    return _Maker(make, pipe.transformer, pipe)
