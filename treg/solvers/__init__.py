"""The solvers, by name: each joins SOLVERS with one line (its function and its config dataclass).

    latent.py     DDIM, TReg, DPS, PSLD, P2L, RED-diff: one loop each, the prior and operator as arguments
    fast.py       CCI (C-ΠGDM), ΠGDM, DDRM: few-step solvers that use H⁺ of the measurement on the latents
    peers.py      the peers' solvers: DiffPIR, DAPS, ReSample
    particles.py  TDS, the twisted diffusion sampler, and TDS-SVD, its exact-Gaussian form in H's spectral basis:
                  sequential Monte Carlo, consistent as particles → ∞
    inversion.py  DDIM inversion, fixed-point and RNRI inversion, and the warm start some solvers can use

Solvers never load a model: the prior arrives as an argument (treg.priors.load builds one).
"""
import dataclasses

from treg.config import CONFIGS, load_solver
from treg.solvers.fast import CCIConfig, DDRMConfig, PiGDMConfig, cci, ddrm, pigdm
from treg.solvers.latent import (DDIMConfig, DPSConfig, P2LConfig, PSLDConfig, REDDiffConfig, TRegConfig, ddim, dps,
                                 p2l, psld, reddiff, treg)
from treg.solvers.particles import TDSConfig, TDSSVDConfig, tds, tds_svd
from treg.solvers.peers import DAPSConfig, DiffPIRConfig, ReSampleConfig, daps, diffpir, resample

SOLVERS = {
    "ddim": (ddim, DDIMConfig),
    "treg": (treg, TRegConfig),
    "dps": (dps, DPSConfig),
    "psld": (psld, PSLDConfig),
    "p2l": (p2l, P2LConfig),
    "reddiff": (reddiff, REDDiffConfig),
    "cci": (cci, CCIConfig),
    "pigdm": (pigdm, PiGDMConfig),
    "ddrm": (ddrm, DDRMConfig),
    "diffpir": (diffpir, DiffPIRConfig),
    "daps": (daps, DAPSConfig),
    "resample": (resample, ReSampleConfig),
    "tds": (tds, TDSConfig),
    "tds-svd": (tds_svd, TDSSVDConfig),
}


def with_noise(cfg, noise_scale):
    """cfg with sigma_y = the task's noise std where the solver models y's noise and its YAML leaves it unset
    (ΠGDM, DDRM, DiffPIR, DAPS, TDS, TReg's cg_lamb_noise option); any other config as it is."""
    return dataclasses.replace(cfg, sigma_y=noise_scale) if getattr(cfg, "sigma_y", 0) is None else cfg


def configure(name, steps=None, w=None, overrides=None, noise_scale=None, folder=CONFIGS / "solver"):
    """(solver function, config) of <folder>/<name>.yaml, which names its solver (cci-noiseless → cci): the YAML with
    `overrides` on top, then `steps` and cfg_guidance = `w` where the config has those fields (None keeps the YAML's),
    and σ_y = `noise_scale` where the solver models y's noise and the YAML leaves it unset (with_noise)."""
    solver, cfg = load_solver(folder / f"{name}.yaml", SOLVERS, overrides)
    fields = {f.name for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", steps), ("cfg_guidance", w))
                                      if k in fields and v is not None})
    if noise_scale is not None:
        cfg = with_noise(cfg, noise_scale)
    return SOLVERS[solver][0], cfg
