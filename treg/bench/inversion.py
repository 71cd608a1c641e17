"""Inversion benchmark: round trips of DDIM inversion, FPI and RNRI on the analytic prior and the tiny random SD,
then the experimental solver warm start on the exact bed. The beds, the columns and the flags are described with its
command line, `inversion` in treg/bench/flags.py (`python -m treg bench inversion --help`); main(argv) is
run(flags.inversion(argv)).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from treg.bench import flags
from treg.bench.beds import SETTINGS, accuracy_task
from treg.config import SAMPLES, ConfigError
from treg.hub import resolve_device
from treg.images import load_image
from treg.priors.load import load_prior
from treg.profiling import PRIOR_PARTS, Profiler
from treg.runs import cli_args, markdown, mean_interval, write_report
from treg.solvers.inversion import InversionConfig, evaluate, invert

NULL_PROMPT = "out of focus, depth of field"
# (name in the tables, InversionConfig fields): both FPI settings and both RNRI forms
SETTINGS = (("ddim", {"method": "ddim"}),
            ("fpi K=20 (official)", {"method": "fpi"}),
            ("fpi K=2 (rnri's cost)", {"method": "fpi", "iters": 2}),
            ("rnri euler (official)", {"method": "rnri"}),
            ("rnri vp (constant α)", {"method": "rnri", "rnri_form": "vp"}))


def round_trips(prior, size, cfg, seeds):
    """Per-image measures of one inversion setting over every sample image × seed."""
    captions = yaml.safe_load((SAMPLES / "captions.yaml").read_text())
    x = torch.cat([load_image(SAMPLES / name, size) for name in captions]).to(prior.device)
    with torch.no_grad():
        uc = prior.embed([NULL_PROMPT])
        c = prior.embed(list(captions.values()))
    profiler = Profiler(prior.device)
    timed = profiler.wrap(prior, PRIOR_PARTS)
    out = {k: [] for k in ("latent_error", "round_trip_psnr", "implicit_residual", "nfe", "seconds")}
    for seed in range(seeds):
        gens = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(x))]
        with torch.no_grad():
            z0 = prior.encode(x, gens)
        infos = []
        profiler.reset()
        begin = time.perf_counter()
        z = invert(timed, z0, cfg, c=c, uc=uc, generator=gens, callback=infos.append)
        wall = time.perf_counter() - begin
        _, measures = evaluate(prior, x, z0, z, infos, cfg, c=c, uc=uc)
        for k in ("latent_error", "round_trip_psnr", "implicit_residual"):
            out[k] += measures[k].tolist()
        out["nfe"] += [profiler.report(wall, len(x))["nfe"]] * len(x)
        out["seconds"] += [wall / len(x)] * len(x)
    return out


def round_trip_table(prior, size, args, grid, bar, skip=()):
    """Rows over (steps, adjustment) × method. Seeds are repeated only with the adjustment, whose noise they
    draw; without it the analytic prior has no randomness and the tiny SD only its VAE sample (one per image).
    `skip`: (steps, setting name) pairs left out."""
    rows = []
    with torch.no_grad():  # one untimed call pays the one-off setup (kernels; the analytic prior's means)
        prior.eps(prior.encode(load_image(SAMPLES / "cat_1.jpg", size).to(prior.device)), 1, prior.embed([""]))
    for steps, adjust in grid:
        for name, fields in SETTINGS:
            if (steps, name) in skip:
                continue
            cfg = InversionConfig(steps=steps, cfg_guidance=args.cfg_guidance, prompt_aware=adjust, **fields)
            m = round_trips(prior, size, cfg, args.seeds if adjust else 1)
            rows.append({"steps": steps, "adjust": adjust, "method": name, "n": len(m["nfe"]),
                         **{k: mean_interval(v) for k, v in m.items()}})
            bar.update()
    return rows


def format_round_trips(rows):
    pm = lambda v, f: f"{v[0]:{f}} ± {v[1]:{f}}"
    body = [[r["steps"], "on" if r["adjust"] else "off", r["method"], pm(r["latent_error"], ".2e"),
             pm(r["round_trip_psnr"], ".1f"), pm(r["implicit_residual"], ".1e"), f"{r['nfe'][0]:.0f}",
             f"{r['seconds'][0]:.3f}", r["n"]] for r in rows]
    return markdown(["steps", "adjust", "method", "latent error", "round-trip PSNR dB", "implicit residual",
                     "NFE", "s/image", "n"], body)


def warm_start_table(args):
    """Accuracy-bed rows (treg.bench.beds.accuracy_task: ×16 SR, treg, dps and cci, true and other prompt) for the
    plain and warm starts."""
    # invert to t = 1 inverts nothing (the last step is the identity with the official shift): encode(A⁺y) is
    # only re-noised to init_t, SDEdit from A⁺y, the baseline that tells what the inversion itself adds
    label = lambda t, s: f"init_t {t}, " + ("deterministic" if s == t else "SDEdit (no inversion)" if s == 1
                                             else f"invert to {s}, re-noise")
    settings = [("plain (noise, t = 996)", {})] + [
        (label(t, s), {"init": "inversion", "init_t": t, "init_invert_t": s})
        for t, s in ((800, 800), (500, 500), (200, 200), (800, 200), (800, 1), (500, 100), (500, 1))]
    # cci starts at k_start = 566 from μ·H⁺y + σ·n, itself an SDEdit-like start; "inversion" replaces it
    settings = [(label, ("treg", "dps"), fields) for label, fields in settings] + [
        ("cci: plain (μ·H⁺y + σ·n at k 566)", ("cci",), {}),
        ("cci: invert to 100, re-noise to k 566", ("cci",), {"init": "inversion", "init_invert_t": 100}),
        ("cci: invert to k 566 (deterministic)", ("cci",), {"init": "inversion", "init_invert_t": 566})]
    rows = []
    with tqdm(total=sum(len(SETTINGS) * len(solvers) for _, solvers, _ in settings), file=sys.stderr,
              unit="solve") as bar:
        for label, solvers, fields in settings:
            bed = argparse.Namespace(image_size=64, seed=0, seeds=args.seeds_ws, solvers=list(solvers), steps=None,
                                     cfg_guidance=None, set={f"{s}.{k}": v for s in solvers for k, v in fields.items()})
            for row in accuracy_task("super-resolution", bed, bar)[0]:
                if row["setting"] != "w=0":
                    rows.append({"start": label, **{k: row[k] for k in ("solver", "setting", "residual",
                                                                        "prompt_accuracy", "nfe", "seconds", "seeds")}})
    body = [[r["start"], r["solver"], r["setting"], f"{r['residual']:.2f}", f"{r['prompt_accuracy']:.0%}",
             f"{r['nfe']:.0f}", f"{r['seconds']:.2f}", r["seeds"]] for r in rows]
    return rows, markdown(["start", "solver", "prompt", "residual / floor", "prompt acc.", "NFE", "s/solve",
                           "seeds"], body)


def run(args):
    """The benchmark for flags.inversion's arguments: writes the report and prints the tables."""
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(1)
    steps_list = [int(s) for s in args.steps.split(",") if s]
    analytic = load_prior("analytic", device)
    with tempfile.TemporaryDirectory() as tmp:
        from treg.priors.tiny import build_tiny_sd
        tiny = load_prior(str(build_tiny_sd(Path(tmp) / "tiny-sd")), device, torch.float32)
    both = [(s, a) for s in steps_list for a in (False, True)]
    # the tiny SD's 200-step runs with the adjustment would take minutes and add nothing: see its 10/50 rows
    # and its FPI-20 beyond 50 steps would take minutes more: no method inverts this random model anyway
    tiny_skip = {(s, SETTINGS[1][0]) for s in steps_list if s > 50}
    beds = [("analytic prior, 64 px (latent 4×8×8)", analytic, 64, both, ()),
            ("analytic prior, 512² (latent 4×64×64)", analytic, 512, [(50, False)], ()),
            ("tiny random SD, 64 px", tiny, 64, [(s, a) for s, a in both if s <= 50 or not a], tiny_skip)]
    total = sum(len(grid) * len(SETTINGS) - len(skip) for _, _, _, grid, skip in beds)
    tables, results = [], {}
    with tqdm(total=total, file=sys.stderr, unit="setting") as bar:
        for title, prior, size, grid, skip in beds:
            bar.set_description(title)
            rows = round_trip_table(prior, size, args, grid, bar, skip)
            results[title] = rows
            tables.append(f"### {title}\n\n{format_round_trips(rows)}")
    text = (f"Round trips, w = {args.cfg_guidance} for inversion and regeneration, official_shift on, device "
            f"{device.type}. fpi K=20: the official FPI (FPI/main.py:51); fpi K=2: at RNRI's cost. rnri (K = 2, "
            "α = 0.1, NewtonRaphsonInversion/main.py:55) euler: the official step (start √(ᾱ/ᾱ')·z', prior weight "
            "α·√ᾱ); vp: the same step in VP latents (start z', constant α). Mean ± 95% t-interval over n = images "
            "× seeds; NFE and s/image of the inversion alone.\n\n"
            + "\n\n".join(tables) + "\n")
    report = {"settings": cli_args(args), "round_trips": results}
    if not args.skip_warm_start:
        rows, table = warm_start_table(args)
        report["warm_start"] = rows
        text += ("\n### Warm start on the exact bed (×16 SR, 64 px, 200 steps, treg and dps YAML defaults)\n\n"
                 + table + "\n")
    write_report(args.out, text, report)
    print(text)


def main(argv=None):
    run(flags.inversion(argv))


if __name__ == "__main__":
    main()
