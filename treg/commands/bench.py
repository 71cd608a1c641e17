"""python -m treg bench NAME [ARGS]: run one benchmark of treg/bench/ (each writes OUT.md and OUT.json under runs/
by default; `--out assets/NAME` refreshes a committed report). `python -m treg bench NAME --help` describes one."""
import importlib

from treg.bench import flags
from treg.commands import choose

# NAME: what it answers. Its command line is flags.NAME (treg/bench/flags.py), its run treg/bench/NAME.py.
BENCHMARKS = {
    "accuracy": "does each solver fit y, and does the prompt choose the solution? (exact posterior, analytic prior)",
    "calibration": "are a solver's outputs across seeds distributed like the exact posterior? (analytic prior)",
    "fast": "the few-step solvers (CCI, ΠGDM, DDRM) against TReg and DDIM at matched NFE (analytic prior)",
    "particles": "does TDS's returned particle sample the exact posterior as N grows? (analytic prior)",
    "deepinv": "deepinv 0.5's DDRM, DiffPIR and DPS against ours, same prior, operator and y (needs deepinv)",
    "inversion": "DDIM/FPI/RNRI round trips, and warm starts from an inversion on the accuracy bed",
    "speed": "seconds, NFE and memory per solver: measured parts composed to full size (tiny model or real one)",
    "gpu": "every solver on an accelerator at full size, fp32/fp16/bf16 (random full-size SD-1.5 by default)",
}


def usage():
    width = max(map(len, BENCHMARKS))
    return __doc__ + "\nbenchmarks:\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, what in BENCHMARKS.items())


def main(argv=None):
    chosen = choose(argv, BENCHMARKS, usage(), "benchmark")
    if chosen:
        name, rest = chosen
        args = getattr(flags, name)(rest)  # --help and a bad flag answer here, before the benchmark imports torch
        importlib.import_module(f"treg.bench.{name}").run(args)


if __name__ == "__main__":
    main()
