"""The command lines of `python -m treg bench NAME`: for each benchmark its --help text (the bed, the columns, example
commands) and its flags, as one function NAME(argv) -> argparse.Namespace. Only the standard library and treg.config
load here: treg/commands/bench.py parses with these functions before it imports the benchmark's module, so --help and a
bad flag answer before torch loads, and treg/bench/NAME.py's main(argv) parses with the same function. A default that
needs the solvers (every entry of SOLVERS) is None here; the benchmark fills it in.
"""
import argparse
import sys
from pathlib import Path

from treg.config import parse_set


def parser(name, description):
    return argparse.ArgumentParser(prog=f"python -m treg bench {name}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def comma_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


ACCURACY = """\
Accuracy benchmark against the exact posterior: does each solver fit y, and does the prompt choose the solution?

For each task (configs/task/<name>.yaml at --image_size), text setting and seed, every solver of treg.solvers.SOLVERS
(its configs/solver/<name>.yaml, --steps and --set applied) solves y = A x + σn on an analytic prior built so that
only the text can choose (`grid_prior`): components μ_(i,k) = encode(x_i) + δ_k for sample images x_i and "details"
δ_k that the measurement cannot see, captioned with image k's caption. y of image i selects the group i (its
visible content); within it the K details are ambiguous and the exact posterior weights follow the text. Seed j
measures x = decode(μ_(j,j)) (image j mod K with its own detail). Text settings:
    w=0    no text: the prompt is the null prompt and cfg_guidance = 0 (for solvers with that field);
    true   the caption of the measured image's detail;
    other  the caption of the next image (k + 1 mod K);
for the last two cfg_guidance is --cfg_guidance, or the solver YAML's value (at least 1, so the prompt is used).
Columns (means over seeds):
    residual      ‖y − A x̂‖ / (σ√m), 1 = the noise floor;
    prompt acc.   fraction of solutions that land in the prompted component: the component with the prompt's
                  caption of largest exact posterior weight under that prompt (–  for w=0);
    landed        where solutions land: counts per detail caption among components of posterior weight ≥ 1e-3,
                  "off" for the rest (not measurement-consistent), then the counts the exact posterior expects;
                  for w=0 this is the landing distribution against the posterior (≈ prior) weights;
    post. weight  exact posterior weight of the component landed in (the nearest posterior mean to E(x̂));
    rel. L2       ‖E(x̂) − m_k‖ / ‖m_k‖ to that nearest posterior mean m_k;
    NFE           noise-prediction evaluations per image (each latent in an eps batch counts one; CFG counts 2);
    s/solve       wall time per image (seeds are solved as one batch).
Solutions are scored as returned, not clamped to [-1, 1]. Blur leaves no latent direction unseen at 64 px (M is
injective on latents), so there the details lie along the weakest directions, seen in y at ≤ 0.5σ (the posterior
weights then move slightly with y), and s shrinks to keep them ≥ 20 s apart. The default grid takes ~6 min on one
CPU core, ~5 of them PSLD on motion blur (a 50-step CG pseudo-inverse of the blur, backpropagated, at each of 200
steps); ~1 min without it.

    python -m treg bench accuracy                                  # 4 tasks × 3 settings × 5 seeds × every solver
    python -m treg bench accuracy --solvers treg,ddim --tasks super-resolution-x8 --seeds 10 \\
        --set treg.use_AN=true --set treg.null_lr=1e-3 --cfg_guidance 5      # TReg with the README flags

Writes OUT.md and OUT.json (default runs/accuracy; `--out assets/accuracy` refreshes the committed report) and
prints the table. Offline: the analytic prior only.
"""
TASKS = ("super-resolution", "gauss-deblur", "motion-deblur", "inpainting")


def accuracy(argv=None):
    p = parser("accuracy", ACCURACY)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated configs/task names (default: %(default)s)")
    p.add_argument("--solvers", default=None, help="comma-separated solvers (default: every entry of SOLVERS)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per (task, setting) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=64, help="image side, at most 128 (default: %(default)s)")
    p.add_argument("--steps", type=int, help="override every solver's steps (default: the YAMLs')")
    p.add_argument("--cfg_guidance", type=float, help="w of the text settings (default: each YAML's, at least 1)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="SOLVER.KEY=VALUE",
                   help="override a solver YAML field, e.g. treg.use_AN=true (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the tensors are tiny (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"), help="writes OUT.md, OUT.json "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    args.tasks = comma_list(args.tasks)
    args.solvers = None if args.solvers is None else comma_list(args.solvers)
    return args


CALIBRATION = """\
Calibration benchmark against an exact multi-modal posterior: does each solver *sample* the posterior (the right
modes, in the right proportions, with the right spread), what does guidance do to that, what happens when the text
contradicts the data, how does it all degrade as NFE falls, and do these numbers catch known-wrong solvers?

The bed (treg/bench/beds.py): ×8 SR at 64², one measurement y of a cat whose three hidden "details" (striped,
spotted, plain) the measurement cannot see; base weights 0.6/0.3/0.1 on them and a fourth component (rocket) that y
rules out; component width s = 0.1. Every solver of treg.solvers.SOLVERS runs with its configs/solver/<name>.yaml,
only `steps` and `cfg_guidance` set by the experiment, the same for every solver; the null prompt is "" (the zero
embedding, so π_uc is the base weights). Each cell solves the same y with --seeds solver seeds. Experiments:
    calibration   w = 0 at every --steps: landing frequencies vs the exact posterior weights, spread, residuals;
    guidance      prompt "plain" at w ∈ --guidance (--main_steps): landing vs the CFG-tilted target π_uc^(1−w)·π_c^w
                  and vs the landing law of the exact CFG sampler (treg.bench.beds.cfg_ode, with y's likelihood);
    conflict      prompt "rocket" (ruled out by y) at w = --conflict_w (--main_steps): residual and landing;
    sensitivity   each known-wrong variant of treg.bench.beds.VARIANTS against its solver, w = 0, at every
                  --sensitivity_steps, same seeds: flagged by each statistic whose paired sign-flip permutation
                  p-value is ≤ 0.05/7 (Bonferroni); the control (TReg on disjoint seeds, a genuine null) must not
                  be, and the rule's false-flag rate under independent exact-draw cells is measured.
Statistics, each with a 95 % bootstrap interval over the seeds (1000 resamples):
    tv               ½Σ|landing frequency − target weight| over the 4 components (landed = nearest posterior mean);
    spread meas/null pooled within-component variance of the solutions in the measured / null directions of M,
                     over the exact posterior's: 1 = calibrated, → 0 = collapsed to a point, > 1 = over-dispersed;
    residual         mean ‖y − A x̂‖/(σ√m) (1 = the noise floor);
    residual W1      Wasserstein-1 distance between the solver's residuals and those of 4000 exact posterior draws;
    rel. L2          mean ‖ẑ − m_k‖/‖m_k‖ to the nearest exact posterior mean m_k;
    consistent       fraction landed in a component that y allows (exact posterior weight ≥ 1e-3).
Row `exact` draws --seeds samples from the exact (or tilted) posterior itself: what a perfect sampler scores at this
seed count (TV and W1 are not 0 at finite n). NFE counts noise predictions per image (CFG counts 2).

    python -m treg bench calibration     # the full report: 32 min wall with 1 thread on the shared 2-core CPU
                                         # (load 5-6), 16 min of CPU time (504 s user + 459 s system); p2l takes
                                         # 42 % of the wall time, the statistics 5 % (--solvers to choose)
    python -m treg bench calibration --solvers treg,dps --seeds 50 --steps 10,50 --out /tmp/cal

Writes OUT.md, OUT.json and OUT.png (NFE curves) (default runs/calibration; `--out assets/calibration` refreshes the
committed report). Offline: the analytic prior only.
"""
TEST_SEEDS = 32  # the seed count of tests/test_calibration.py's sensitivity test (its false-flag rate is reported)


def calibration(argv=None):
    p = parser("calibration", CALIBRATION)
    p.add_argument("--solvers", default=None, help="comma-separated solvers or configs/solver YAML names, e.g. "
                   "cci-noiseless (default: every entry of SOLVERS)")
    p.add_argument("--seeds", type=int, default=200, help="solver seeds per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of y's noise and the first solver seed (default: 0)")
    p.add_argument("--steps", type=int_list, default=[10, 20, 50, 100, 200],
                   help="step counts of the NFE curves (default: 10,20,50,100,200)")
    p.add_argument("--main_steps", type=int, default=200, help="steps of guidance and conflict (default: 200)")
    p.add_argument("--guidance", type=float_list, default=[0.0, 1.0, 2.0, 5.0], help="w values (default: 0,1,2,5)")
    p.add_argument("--conflict_w", type=float, default=5.0, help="w of the conflict prompt (default: 5)")
    p.add_argument("--variants", default=None,
                   help="comma-separated known-wrong variants of treg.bench.beds.VARIANTS and the control, '' for "
                   "none (default: every variant and the control)")
    p.add_argument("--null_repeats", type=int, default=200, help="repeats of the false-flag measurement at --seeds "
                   f"and at {TEST_SEEDS} seeds, run when --variants is not empty (default: %(default)s)")
    p.add_argument("--sensitivity_steps", type=int_list, default=[10, 50],
                   help="step counts of the sensitivity check (default: 10,50)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="SOLVER.KEY=VALUE",
                   help="override a solver YAML field for the calibration, guidance and conflict cells, e.g. "
                        "cci.k_start=999 (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the tensors are tiny (default: 1)")
    p.add_argument("--out", type=Path, default=Path("runs/calibration"), help="writes OUT.md, OUT.json, OUT.png")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.solvers = None if args.solvers is None else comma_list(args.solvers)
    args.variants = None if args.variants is None else comma_list(args.variants)
    return args


FAST = """\
Accuracy per NFE on the exact bed: CCI, ΠGDM and DDRM at 5, 10 and 20 steps against TReg at 200 steps and
TReg and DPS at the same step counts, all scored against the exact posterior.

Bed: the analytic prior of `--model analytic` (AnalyticPrior.from_folder(): 4 low-resolution groups × 4 details
that ×16 SR cannot see, s = 0.03) at --image_size (64: latent 4×8×8), σ_y = the task's noise_scale, the null
prompt "out of focus, depth of field". Seed j measures x = decode(μ_(i,i)), i = j mod 4 (sample image i with its
own detail, so that y is realisable by the prior; a real photo is not, outside SR), with y = A x + σn; its exact
posterior (treg.priors.posterior's formulas with a dense MᵀM) is a mixture Σ_k w_k N(m_k, Σ). The row "exact" scores
exact posterior samples (k ~ w, z ~ N(m_k, Σ)) the same way: the numbers a calibrated sampler would get.
Text settings: "true" (the image's caption), "other" (the next image's caption), "w=0" (null prompt only).
Every solver uses its configs/solver YAML with `steps` set, cfg_guidance = --cfg_guidance (0 for w=0), σ_y = the
task's noise, TReg with the README flags (adaptive negation, null_lr 1e-3). Columns (mean over seeds, ± the 95%
interval half-width; Wilson interval for fractions):
    residual     ‖y − A x̂‖/(σ√m), 1 = the noise floor (compare with the "exact" row, not with 1)
    prompt acc.  fraction landing in the prompted component (largest posterior weight among the prompt's caption)
    mode TV      total variation between where solutions land (per detail caption) and the posterior's weights
    within-mode  ‖E(x̂) − m_k‖ / √tr Σ for the component k landed in: ≈ 1 for an exact posterior sample (its
                 spread), ≪ 1 collapsed onto the mean, ≫ 1 off the posterior
    NFE          noise-prediction evaluations per image (CFG counts 2); backward passes are extra for cci, pigdm, dps

    python -m treg bench fast                               # 2 tasks × 3 settings × 8 seeds × 16 methods, 28 s
    python -m treg bench fast --seeds 2 --tasks super-resolution --methods cci-5,treg-200 --out /tmp/fast

Writes OUT.md, OUT.json and OUT.png (default runs/fast; `--out assets/fast` refreshes the committed report) and
prints the table. Offline: analytic prior only.
"""
FEW_STEP = ("cci", "pigdm", "ddrm", "treg", "dps", "diffpir", "daps")
METHODS = [(name, steps) for name in FEW_STEP for steps in (5, 10, 20)] + [("treg", 200)]


def fast(argv=None):
    p = parser("fast", FAST)
    p.add_argument("--tasks", default="super-resolution,inpainting", help="configs/task names (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per (task, setting) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=64, help="image side, at most 128 (default: %(default)s)")
    p.add_argument("--cfg_guidance", type=float, default=5.0, help="w of the text settings (README: 5.0)")
    p.add_argument("--noise_scale", type=float, default=None, help="std of y's noise (default: the task's, 0.01)")
    p.add_argument("--methods", default=",".join(f"{n}-{s}" for n, s in METHODS),
                   help="comma-separated SOLVER-STEPS; SOLVER is a configs/solver YAML name, e.g. cci-noiseless "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/fast"), help="writes OUT.md, OUT.json, OUT.png "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    args.tasks = comma_list(args.tasks)
    args.methods = [m.rpartition("-") for m in comma_list(args.methods)]
    return args


INVERSION = """\
Inversion benchmark: round-trip error, implicit-equation residual, NFE and seconds per image of DDIM inversion,
FPI (K = 20 as the official code, and K = 2 at RNRI's cost) and RNRI (K = 2, α = 0.1; its official Euler-coordinate
step, and the same step in VP latents with a constant α) at 10/50/200 steps, prompt-aware adjustment off and on, on
the analytic prior (64 px, the reference's bed, and 512²) and the tiny random SD; then the experimental solver warm
start on the exact bed.

    python -m treg bench inversion                    # everything, a few minutes on one CPU core
    python -m treg bench inversion --seeds 1 --steps 10,50 --skip_warm_start

Round trip: each sample image (samples/captions.yaml) is inverted with its own caption and w = --cfg_guidance
(null prompt "out of focus, depth of field"), regenerated by deterministic DDIM with the same triples, and compared
with z0 = encode(x): latent error ‖regenerated − z0‖/‖z0‖ and PSNR of the decoded latents. Means over images ×
seeds with 95% t-intervals (--seeds repeats only the prompt-aware runs, whose noise they draw).
Warm start: the accuracy bed (treg.bench.beds.accuracy_task) on ×16 SR (exact posterior; prompt accuracy = landing
in the prompted component) for treg, dps and cci, plain start against --init inversion at several init_t /
init_invert_t.
Writes OUT.md and OUT.json (default runs/inversion; `--out assets/inversion` refreshes the committed report) and
prints the tables.
"""


def inversion(argv=None):
    p = parser("inversion", INVERSION)
    p.add_argument("--steps", default="10,50,200", help="DDIM step counts (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds where a seed matters (default: %(default)s)")
    p.add_argument("--seeds_ws", type=int, default=5, help="seeds of the warm-start comparison (default: %(default)s)")
    p.add_argument("--cfg_guidance", type=float, default=2.0, help="w of inversion and regeneration (default: 2)")
    p.add_argument("--skip_warm_start", action="store_true", help="only the round-trip tables")
    p.add_argument("--out", type=Path, default=Path("runs/inversion"), help="writes OUT.md, OUT.json")
    p.add_argument("--device", help="torch device of the round trips (default: the accelerator, else cpu; the "
                   "report's seconds are from one CPU core); the warm-start comparison runs on cpu")
    return p.parse_args(argv)


SPEED = """\
Speed and memory benchmark: wall time per image and its breakdown (UNet, VAE decode/encode, CLIP image encoder,
operator, everything else), NFE and peak memory for every solver, plus the blur, gradient-checkpointing and batch
comparisons. Each configuration runs `solve.py` in its own process so that peak memory is its own.

    python -m treg bench speed                      # tiny random SD built offline, 512², 50 steps
    python -m treg bench speed --model PATH_OR_ID --steps 200 --device cuda

Writes OUT.md and OUT.json (default runs/speed; `--out assets/speed` refreshes the committed report) and prints the
tables.
"""


def speed(argv=None):
    p = parser("speed", SPEED)
    p.add_argument("--model", default="tiny", help="'tiny' (built offline), 'analytic', a hub id or a folder")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per solve (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=512, help="(default: %(default)s)")
    p.add_argument("--device", help="torch device (default: as solve.py)")
    p.add_argument("--solvers", default="ddim,treg,dps,psld,p2l,reddiff", help="(default: %(default)s)")
    p.add_argument("--fast", default="cci,pigdm,ddrm,treg", help="solvers also timed at their YAML step counts "
                   "(the few-step solvers against TReg's 200; a solver the model cannot run is listed as an error) "
                   "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/speed"), help="output prefix (default: %(default)s)")
    p.add_argument("--components", action="store_true", help="the real-size report from the parts: each model "
                   "call once at --image_size (seconds, peak RSS), each solver's time composed from them")
    p.add_argument("--parts", default="", help="with --components: parts to measure (default: all)")
    p.add_argument("--checkpointing", action="store_true", help="with --components: the backward parts again "
                   "with gradient checkpointing")
    p.add_argument("--compose", type=Path, help="a --components report's JSON: compose each solver's time per "
                   "image from it (tiny-model call counts; no full-size model needed)")
    p.add_argument("--outside_from", type=Path, default=Path("assets/speed.json"), help="with --compose: the "
                   "tiny benchmark's report whose seconds outside the models per step are used (default: "
                   "%(default)s)")
    p.add_argument("--count_size", type=int, default=32, help="with --compose: image size of the tiny-model runs "
                   "that count each schedule's calls (default: %(default)s)")
    args = p.parse_args(argv)
    if args.compose and args.solvers == p.get_default("solvers"):
        args.solvers = ""  # composing: every solver unless --solvers names some
    return args


GPU = """\
GPU check at Stable Diffusion's real size, one command that finishes within 8 minutes on one data-centre GPU:

    python -m treg bench gpu --out assets/gpu            # builds a random full-size SD-1.5 on the GPU first
    python -m treg bench gpu --model DIR --out assets/gpu  # a folder of `python -m treg tiny --full-size DIR`

For each dtype (fp16, bf16) it runs every solver (treg.solvers.SOLVERS) on ×16 SR of the cat at 512² for --steps
steps: a dtype or device error is reported as its one line, and each run records whether every step's estimate and
the output are finite, its peak memory (torch.cuda.max_memory_allocated), its seconds per step and the host syncs
its loop made (torch.cuda's sync debug mode counts them). It checks the VAE decode and the CG prox in the model
dtype against fp32, and times the CFG UNet call of one step eagerly and under torch.compile. It writes OUT.md and
OUT.json, naming the machine. Parts that do not fit --budget_s are listed as skipped.

The smoke form (the test suite's): --device cpu --model tiny --image_size 64.
"""


def gpu(argv=None):
    p = parser("gpu", GPU)
    p.add_argument("--model", default="full", help="'full' (a random full-size SD-1.5 built on the device into a "
                   "temporary folder), 'tiny', or a folder (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: this machine's accelerator)")
    p.add_argument("--image_size", type=int, default=512, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="steps per solver: 3 give TReg one data-consistency step "
                   "and two plain ones (default: %(default)s)")
    p.add_argument("--solvers", default="", help="comma-separated (default: every solver)")
    p.add_argument("--dtypes", default="fp16,bf16", help="(default: %(default)s)")
    p.add_argument("--compile_dtypes", default="fp16", help="dtypes whose UNet step is also timed under "
                   "torch.compile (default: %(default)s)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    p.add_argument("--reps", type=int, default=10, help="timed UNet calls per mode (default: %(default)s)")
    p.add_argument("--budget_s", type=float, default=390, help="parts starting after this many seconds of checks "
                   "are skipped; with the build and the loads the whole run stays within 8 minutes "
                   "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu"), help="output prefix (default: %(default)s)")
    return p.parse_args(argv)


PARTICLES = """\
Convergence of a particle sampler (treg.solvers.particles: tds, or tds-svd with --solver) on the calibration bed as
the particle count N grows: does the one particle it returns per seed sample the exact posterior?

The bed is treg/bench/beds.py's (×8 SR at 64², σ = 0.01, exact posterior weights 0.6/0.3/0.1 on three null-space
details); the solver runs with configs/solver/SOLVER.yaml, only `particles`, `steps` and `cfg_guidance` set here (and
--set). Settings: w = 0 with the empty prompt and w = 1 with the guided prompt ("plain"): the analytic ε is the true
score, so the chain's prior is exact and the exact posterior is the target that the sampler converges to as N → ∞ (up
to the DDPM chain's discretisation at --steps, and for tds-svd its kernel's τ²). Other w: CFG's field is no prior's
score, so there is no posterior to converge to; those rows are reported against the tilted posterior (TV) and the
exact CFG sampler's landing law (TV CFG), with no claim. Per (setting, N), the statistics of
treg.bench.beds.statistics over the seeds with 95 % bootstrap intervals (1000 resamples): TV, spread ratio
measured/null, residual and its W1 to the exact posterior's residuals (4000 draws); NFE per image (N·steps, CFG ×2),
the mean final ESS and resampling count per seed, seconds per seed. Seeds per cell: min(--seeds, --particle_budget /
N). Row `exact`: exact posterior draws at --seeds.

    python -m treg bench particles --threads 1 --out assets/particles    # the committed report
    python -m treg bench particles --solver tds-svd --threads 1 --out assets/particles-svd
    python -m treg bench particles --particles 1,4 --seeds 8 --steps 5 --guidance 0 --out /tmp/particles

Writes OUT.md, OUT.json and OUT.png (each statistic against N). Offline: the analytic prior only.
"""


def particles(argv=None):
    p = parser("particles", PARTICLES)
    p.add_argument("--solver", choices=("tds", "tds-svd"), default="tds", help="the sampler (default: tds)")
    p.add_argument("--particles", type=int_list, default=[1, 4, 16, 64, 256],
                   help="particle counts N (default: 1,4,16,64,256)")
    p.add_argument("--seeds", type=int, default=200, help="seeds per cell at most (default: %(default)s)")
    p.add_argument("--particle_budget", type=int, default=12800,
                   help="particles per cell at most: seeds = min(--seeds, budget / N) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of y's noise and the first solver seed (default: 0)")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float_list, default=[0.0, 1.0, 2.0],
                   help="w values; w = 0 uses the empty prompt, others calibration.GUIDED, \"plain\" (default: 0,1,2)")
    p.add_argument("--chunk", type=int, default=512, help="particles per solver call (memory; default: %(default)s)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="SOLVER.KEY=VALUE",
                   help="override a field of the solver's YAML, e.g. tds.tausq=0.005 (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", type=Path, default=Path("runs/particles"), help="writes OUT.md, OUT.json, OUT.png")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


DEEPINV = """\
Side by side with deepinv 0.5 (the pixel-space reference library): its DDRM, DiffPIR and DPS against ours (the
solvers ddrm, diffpir, dps) on the calibration bed, with the same prior, the same operator and the same y. Not for
CI: it needs deepinv, which needs torchvision, so it runs in a second virtual environment (docs/benchmarks.md).

The bed is treg/bench/beds.py's (×8 SR at 64², σ = 0.01, exact posterior weights 0.6/0.3/0.1 on three null-space
details), seen as a pixel prior: the analytic mixture on its 4×8×8 diffusion variable with an identity "VAE", and
the operator M = A∘decode (192 measured of 256 values) as the pixel operator, so that our solvers take their pixel
path (DiffPIR's prox on the diffusion variable, as the paper and deepinv) and deepinv gets a DecomposablePhysics from
M's SVD and the exact MMSE denoiser of the mixture, in its [0, 1] convention. Cells: ours at its YAML's steps, w = 0;
deepinv as shipped, with the same steps and (DDRM) the same noise levels; and deepinv with one documented difference
removed at a time, to explain a disagreement. DPS's data step is also measured: deepinv's effective step on
∇‖y − A D(x)‖ per step, from one solver step with and without the data term.
Per cell and seed the statistics of treg.bench.beds.statistics with 95 % bootstrap intervals (1000 resamples):
    tv, spread meas/null, residual, residual W1, rel. L2, consistent   (as `python -m treg bench calibration`)
Agreement of a pair of cells: the two-sample permutation test of each statistic (the 2n solutions pooled and
relabelled at random, 2000 permutations, p = (1 + #{|permuted difference| ≥ |observed|})/(1 + 2000)); the pair
agrees when no p-value is ≤ 0.05/7 (Bonferroni over the 7 statistics). The control pair (our DDRM against itself on
disjoint seeds) is a genuine null.

    CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 /work/venv-deepinv/bin/python -m treg bench deepinv --threads 1 \\
        --out assets/deepinv                                                 # the committed report
    python -m treg bench deepinv --seeds 16 --samplers ddrm --out /tmp/deepinv

Writes OUT.md and OUT.json. Exits with a one-line error when deepinv does not import.
"""
DEEPINV_SAMPLERS = ("ddrm", "diffpir", "dps")


def deepinv(argv=None):
    p = parser("deepinv", DEEPINV)
    p.add_argument("--samplers", default=",".join(DEEPINV_SAMPLERS),
                   help="comma-separated, of ddrm, diffpir, dps (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=200, help="solver seeds per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of y's noise and the first solver seed (default: 0)")
    p.add_argument("--permutations", type=int, default=2000, help="relabellings of each two-sample permutation "
                   "test (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the tensors are tiny (default: 1)")
    p.add_argument("--out", type=Path, default=Path("runs/deepinv"), help="writes OUT.md, OUT.json "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.samplers = comma_list(args.samplers)
    unknown = [s for s in args.samplers if s not in DEEPINV_SAMPLERS]
    if unknown:
        p.error(f"--samplers: unknown {', '.join(unknown)} (choose from {', '.join(DEEPINV_SAMPLERS)})")
    return args
