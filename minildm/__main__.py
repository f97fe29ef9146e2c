"""Command line: `python -m minildm demo` trains and shows; `python -m minildm sample` draws from a model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a text-to-image LDM on ShapesDataset and write samples")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--minutes", type=float, default=None,
                      help="wall-clock budget in minutes (default: DemoConfig's, printed when it starts)")
    demo.add_argument("--objective", choices=("epsilon", "v_prediction", "flow"), default=None,
                      help="what the backbone learns: ε, v on a zero-terminal-SNR schedule, or a rectified flow "
                           "(default: DemoConfig's)")
    demo.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--smoke", action="store_true",
                      help="a seconds-long run of the whole pipeline, for testing (--minutes is ignored)")

    sample = commands.add_parser("sample", help="generate images from a saved model")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder written by the demo or LatentDiffusion.save")
    source.add_argument("--pretrained", help="Stable Diffusion 1.x / 2.x: a diffusers folder (model_index.json, "
                                             "unet/, ...) or an original single-file .safetensors checkpoint")
    sample.add_argument("--config", default=None, help="with a single-file --pretrained: a diffusers folder whose "
                                                      "configs and tokenizer/ describe it (default: read the shapes)")
    sample.add_argument("--tokenizer", default=None, help="with a single-file --pretrained and no --config: a "
                                                         "CLIPTokenizer folder (a single file holds none)")
    sample.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="weights' dtype (default auto: float16 on a CUDA GPU for --pretrained, else float32)")
    sample.add_argument("--prompt", required=True, action="append", help="a prompt; repeat for several")
    sample.add_argument("--out", required=True, help="PNG file to write")
    sample.add_argument("--num", type=int, default=None, help="images per prompt (default: 8, 1 with --pretrained)")
    sample.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    sample.add_argument("--sampler", choices=("ddim", "ddpm", "dpm_solver", "euler", "heun"), default=None,
                        help="ddim, ddpm or dpm_solver (DPM-Solver++(2M)) with 'trailing' timesteps for a diffusion "
                             "model, euler or heun for a rectified flow (default: the model's, ddim or euler; "
                             "with --pretrained the folder's scheduler, mapped by minildm.pretrained)")
    sample.add_argument("--height", type=int, default=None, help="image height (default: the model's image size)")
    sample.add_argument("--width", type=int, default=None, help="image width (default: the model's image size)")
    sample.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 3, SD's 7.5 with --pretrained)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None)

    exercises = commands.add_parser("exercises", help="the course's exercises: list them, or write student notebooks")
    exercise_commands = exercises.add_subparsers(dest="exercise_command", required=True)
    exercise_commands.add_parser("list", help="every exercise, with its notebook and what to write")
    student = exercise_commands.add_parser("student", help="write the student versions of the notebooks: "
                                                           "solutions taken out, outputs cleared")
    student.add_argument("notebook_dir", help="the folder of the course's notebooks (notebooks/)")
    student.add_argument("out_dir", help="where to write the student versions")
    otter = exercise_commands.add_parser("otter", help="write a notebook in otter-grader's format, for otter assign")
    otter.add_argument("notebook", help="a course notebook, e.g. notebooks/01_forward_process.ipynb")
    otter.add_argument("out", help="the master notebook to write")

    args = parser.parse_args(argv)
    if args.command == "exercises":
        from . import exercises as course_exercises
        from .exercises.otter import otter_master
        from .exercises.student import write_student_versions

        if args.exercise_command == "list":
            for name in course_exercises.names():
                print(course_exercises.describe(name), end="\n\n")
            return 0
        try:
            if args.exercise_command == "otter":
                notebook = Path(args.notebook)
                master = otter_master(json.loads(notebook.read_text()), notebook.stem)
                Path(args.out).write_text(json.dumps(master, indent=1, ensure_ascii=False) + "\n")
                print(f"wrote {args.out}: run `otter assign {args.out} OUT_DIR --no-pdfs`")
                return 0
            written = write_student_versions(args.notebook_dir, args.out_dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {len(written)} student notebooks to {args.out_dir}")
        return 0
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        if args.minutes is not None and args.minutes <= 0:
            parser.error(f"--minutes must be positive, got {args.minutes}")
        changes = {"seed": args.seed, **({"objective": args.objective} if args.objective else {})}
        if args.smoke:
            config = dataclasses.replace(DemoConfig.smoke(), **changes)
        else:
            config = DemoConfig(**changes, **({"minutes": args.minutes} if args.minutes is not None else {}))
        run_demo(args.out, config, device=args.device)
        return 0

    from . import viz
    from .distributed import pick_device
    from .ldm import LatentDiffusion

    num = args.num if args.num is not None else (1 if args.pretrained else 8)
    if num < 1:
        parser.error(f"--num must be at least 1, got {num}")
    if (args.config or args.tokenizer) and not args.pretrained:
        parser.error("--config and --tokenizer go with --pretrained")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before sampling, not after
    try:
        device = pick_device(args.device)
        sampler = None
        if args.pretrained:
            ldm, sampler = _load_pretrained(args, device)
            guidance = args.guidance if args.guidance is not None else 7.5
        else:
            ldm = LatentDiffusion.load(args.model, device=device)
            guidance = args.guidance if args.guidance is not None else 3.0
        if sampler is None or args.sampler is not None:
            sampler = ldm.make_sampler(args.sampler)
        prompts = [p for p in args.prompt for _ in range(num)]
        images = ldm.generate(prompts, args.steps, sampler=sampler, guidance_scale=guidance,
                              generator=torch.Generator().manual_seed(args.seed), height=args.height, width=args.width,
                              progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pretrained:  # the pictures themselves, side by side, at their size
        from PIL import Image

        row = torch.cat(list(images.cpu()), dim=2).permute(1, 2, 0)  # B x (3, H, W) -> (H, B*W, 3)
        Image.fromarray((row * 255).round().to(torch.uint8).numpy()).save(args.out)
        print(f"wrote {args.out}")
        return 0
    fig = viz.show_images(images.cpu(), titles=prompts, ncols=num)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")
    return 0


def _load_pretrained(args, device):
    """(LatentDiffusion, the folder's sampler or None) for `sample --pretrained`: float16 on a CUDA GPU unless
    --dtype says otherwise, float32 elsewhere (float16 convolutions are slow or missing on CPUs)."""
    from . import pretrained, single_file
    from .ldm import LatentDiffusion

    dtype = {"auto": torch.float16 if torch.device(device).type == "cuda" else torch.float32,
             "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    path = Path(args.pretrained)
    if path.is_file():
        ldm = single_file.load_single_file(LatentDiffusion, path, config=args.config, tokenizer=args.tokenizer,
                                           torch_dtype=dtype)
        sampler = pretrained.load_sampler(args.config, ldm.schedule) if args.config else None
    else:
        ldm = LatentDiffusion.from_pretrained(path, torch_dtype=dtype)
        sampler = pretrained.load_sampler(path, ldm.schedule)
    return ldm.to(device), sampler


if __name__ == "__main__":
    sys.exit(main())
