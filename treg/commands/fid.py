"""python -m treg fid RECON LABEL: FID and KID between two folders of PNGs (pytorch-fid's Inception features; the
maths is treg/fid.py's). python -m treg gather scores every run of a sweep the same way.

    python -m treg fid WORKDIR/recon WORKDIR/label
    python -m treg fid WORKDIR/recon/treg WORKDIR/label --metrics_style official
"""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m treg fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recon", type=Path, help="folder of reconstructions (PNGs, e.g. a workdir's recon/)")
    p.add_argument("label", type=Path, help="folder of the ground truths (PNGs, e.g. the workdir's label/)")
    p.add_argument("--device", help="torch device (default: the accelerator, else cpu)")
    p.add_argument("--metrics_style", default="ours", choices=("ours", "official"),
                   help="official: score the min-max stretched 8-bit view, as the official metric script")
    args = p.parse_args(argv)
    recon, label = sorted(args.recon.glob("*.png")), sorted(args.label.glob("*.png"))
    if len(recon) < 2 or len(label) < 2:  # before torch and Inception load
        sys.exit(f"error: FID/KID need at least 2 PNGs in each folder ({len(recon)} and {len(label)} here)")
    from treg import fid
    from treg.config import ConfigError
    from treg.hub import resolve_device
    from treg.metrics import MetricUnavailable
    try:
        scores = fid.set_metrics(recon, label, fid.load_inception(resolve_device(args.device)),
                                 style=args.metrics_style)
    except (ConfigError, MetricUnavailable) as err:
        sys.exit(f"error: {err}")
    print(f"FID {scores['fid']:.2f}, KID {scores['kid']:.5f}")


if __name__ == "__main__":
    main()
