"""python -m treg food101 DIR: write a fabricated Food-101-layout folder (3 classes × 3 small generated images,
images/<class>/<id>.jpg with meta/test.json, test.txt, classes.txt, labels.txt) for the offline protocol run
`python -m treg reproduce --model analytic --food101 DIR`. Its images are smooth random colour blocks, not food."""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg food101", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="output folder (must not exist yet)")
    p.add_argument("--per_class", type=int, default=3, help="images per class (default: %(default)s)")
    args = p.parse_args(argv)
    if args.folder.exists():
        sys.exit(f"error: {args.folder} exists; choose a new folder")
    if args.per_class < 1:
        sys.exit("error: --per_class must be at least 1")
    from treg.datasets import write_food101
    split = write_food101(args.folder, per_class=args.per_class)
    print(f"{args.folder}: {sum(len(ids) for ids in split.values())} images in {len(split)} classes")


if __name__ == "__main__":
    main()
