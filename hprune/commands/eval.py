"""Score a model on ShapesBench: generate images for held-out captions and score them analytically,
GenEval-style (each stated object present, right colour, shape, size, position; right count), plus
fidelity (PSNR) to the shipped teacher's images from the same noise.

MODEL is `shapes-teacher` (the default; the built-in trained teacher) or a model compressed from it
(an hprune artifact folder, e.g. `hprune compress shapes-teacher --ratio 0.2 --out x` -> x/artifact).
Writes DIR/eval.json (summary, per-attribute and per-template scores, every caption's checks and
detected objects), DIR/grid.png (model vs teacher vs ground truth) and DIR/images/NNNN.png.

examples:
  hprune eval --captions 64 --out eval-teacher
  hprune eval sd-hp20/artifact --captions 64 --out eval-hp20
  hprune eval shapes-teacher --prompts my-captions.txt --out eval-custom"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "score a model on ShapesBench (generated shapes, analytic GenEval-style scores)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default="shapes-teacher",
                   help="shapes-teacher (default) or an artifact compressed from it")
    p.add_argument("--captions", type=int, default=64, help="number of held-out captions (default 64)")
    p.add_argument("--prompts", help="score these captions instead (a file, one per line)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first caption (caption i: seed + i)")
    p.add_argument("--no-reference", action="store_true", help="skip the teacher images (no PSNR)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():  # the process may go on training (tests, notebooks): no global switch
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from hprune.commands import load_weighted_model, read_prompts
    from hprune.errors import HpruneError
    from hprune.io import atomic_dir, check_output, write_json
    from hprune.shapes.evaluate import check_shapes_model, evaluate, generate, heldout_captions, save_grid
    from hprune.shapes.checkpoint import NAME, default_guidance, load_text_encoder, load_transformer

    if args.captions < 1:
        raise HpruneError(f"--captions must be at least 1, got {args.captions}")
    if args.steps < 1:
        raise HpruneError(f"--steps must be at least 1, got {args.steps}")
    check_output(args.out, args.overwrite)
    captions = None
    if args.prompts:
        captions = read_prompts(args.prompts, "captions")
        from hprune.shapes.data import parse_caption

        for c in captions:
            parse_caption(c)  # a caption outside the grammar cannot be scored: say so before sampling
    model = load_weighted_model(args.model, hint="evaluate shapes-teacher or an artifact compressed from it")
    text = load_text_encoder()
    check_shapes_model(model, text)  # before the teacher's reference images, not after them
    guidance = args.guidance if args.guidance is not None else default_guidance()
    kw = dict(steps=args.steps, guidance=guidance, seed=args.seed)
    ref = None
    if not args.no_reference and args.model != NAME:  # the teacher's images for the same captions and noise
        ref = generate(load_transformer(), text, captions or heldout_captions(args.captions), **kw)
    res = evaluate(model, text, captions=captions, n_captions=args.captions, reference=ref, keep_images=True, **kw)
    rows = {args.model if len(args.model) < 24 else "model": res["images"]}
    if ref is not None:
        rows["teacher"] = ref
    if "ground_truth" in res:
        rows["ground truth"] = res["ground_truth"]
    summary = {k: res[k] for k in ("score", "exact", "attributes", "templates", "n", "settings") if k in res}
    for k in ("psnr", "mse"):
        if k in res:
            summary[k] = res[k]
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_json(tmp / "eval.json", {"model": args.model, **summary, "per_caption": res["per_caption"]})
        save_grid(rows, tmp / "grid.png", captions=res["captions"],
                  title=f"{args.model}: ShapesBench score {res['score']:.3f}")
        _write_pngs(res["images"], tmp / "images")
    print(f"ShapesBench score {res['score']:.4f} (exact {res['exact']:.3f}) on {res['n']} captions, "
          f"{args.steps} steps, guidance {guidance:g}")
    print("  " + ", ".join(f"{a} {v:.3f}" for a, v in res["attributes"].items()))
    print("  " + ", ".join(f"{t} {v:.3f}" for t, v in res["templates"].items()))
    if "psnr" in res:
        print(f"  fidelity to the teacher: PSNR {res['psnr']:.2f} dB")
    print(f"outputs in {Path(args.out)}")
    return 0


def _write_pngs(images, folder) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        a = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:04d}.png")
