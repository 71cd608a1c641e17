"""python -m treg NAME [ARGS]: the programs beside solve.py, as subcommands of one entry point (the convention of
`python -m pip`). Each module is imported only when its command runs, so --help and a typo cost no torch import."""
from treg.commands import dispatch

COMMANDS = {
    "invert": "invert images into the noise latent that regenerates them (DDIM inversion, FPI, RNRI)",
    "gather": "collect a sweep of solve.py workdirs into one table (and plot, FID/KID)",
    "reproduce": "the paper's Food-101 protocol: every method × task, then FID/KID/CLIP tables",
    "fid": "FID and KID between two folders of PNGs (a run's recon/ and label/)",
    "figure": "draw the demo figure (input | reconstructions | ...) from solve.py workdirs",
    "tiny": "write a tiny (or full-size) random Stable-Diffusion-shaped model folder, offline",
    "food101": "write a fabricated Food-101-layout folder for the offline protocol run",
    "bench": "run a benchmark: accuracy, calibration, fast, particles, deepinv, inversion, speed, gpu",
}


def usage():
    width = max(map(len, COMMANDS))
    return ("usage: python -m treg COMMAND [ARGS]   (python -m treg COMMAND --help for one)\n"
            "       python solve.py [ARGS]          (solve an inverse problem; python solve.py --help)\n\n"
            "commands:\n" + "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()))


def main(argv=None):
    dispatch(argv, COMMANDS, "treg.commands", usage(), "command", " (python -m treg --help)")


if __name__ == "__main__":
    main()
