"""A tiny, randomly initialised Stable-Diffusion-shaped model folder, built offline.

It has SD-1.5's geometry (4 latent channels, VAE downsampling 8, 77-token CLIP text encoder, the SD noise schedule)
and about 1.6M parameters, so the whole CLI and every solver can be exercised on a CPU without downloading weights.
Its images are meaningless. Usage: `python -m treg tiny DIR` writes a folder that `--model DIR` loads;
`python -m treg tiny --pixel DIR` writes a tiny unconditional pixel model instead (UNet2DModel and DDPMScheduler,
the layout of google/ddpm-celebahq-256), a pixel prior (treg.priors.pixel).

`python -m treg tiny --full-size DIR` writes a random model of SD-1.5's real size instead: its exact UNet, VAE and
CLIP ViT-L/14 text-encoder configs, the ViT-L/14 image encoder of adaptive negation, its scheduler config and a
tokenizer with CLIP's 49408 entries (made-up merges: no vocabulary can be downloaded, and speed and memory do not
depend on which strings the tokens stand for). Its weights are random, so it costs what SD-1.5 costs and draws
noise. About 2.2 GB in fp16 safetensors (the default; --fp32 doubles it).
"""
import argparse
import sys
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="output folder (created; an existing model folder is overwritten)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--pixel", action="store_true", help="a tiny unconditional pixel model instead of a tiny SD")
    kind.add_argument("--full-size", action="store_true",
                      help="a random model of SD-1.5's real size (~1.07 G parameters with the image encoder)")
    p.add_argument("--fp32", action="store_true", help="with --full-size: fp32 weights (default: fp16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = p.parse_args(argv)
    if args.folder.exists() and not args.folder.is_dir():
        sys.exit(f"error: {args.folder} is a file, not a folder")
    if args.fp32 and not args.full_size:
        sys.exit("error: --fp32 applies only with --full-size")
    from treg.priors import tiny
    try:
        if args.full_size:
            from treg.hub import quiet_libraries
            quiet_libraries()  # diffusers' note on casting with to(): these models keep no module in fp32
            import torch
            start = time.perf_counter()
            dtype = torch.float32 if args.fp32 else torch.float16
            folder = tiny.build_full_size_sd(args.folder, args.seed, dtype,
                                             log=lambda line: print(line, file=sys.stderr))
            print(f"{folder}: {tiny.folder_bytes(folder) / 1e9:.2f} GB on disk, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
            print(folder)
            return
        print((tiny.build_tiny_pixel if args.pixel else tiny.build_tiny_sd)(args.folder, args.seed))
    except OSError as err:
        sys.exit(f"error: cannot write {err.filename or args.folder}: {err.strerror or err}")


if __name__ == "__main__":
    main()
