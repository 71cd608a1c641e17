"""`python -m treg invert` end to end on the tiny random SD folder and on the analytic prior."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from treg.commands import invert as invert_cli
from treg.config import SAMPLES
from treg.priors.load import load_prior
from treg.solvers.inversion import InversionConfig, regenerate

ROOT_SAMPLE = str(SAMPLES / "cat_1.jpg")


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_compare_on_tiny_sd_writes_every_file(tiny_sd, tmp_path):
    """Every method's latent, regenerated image and record, the grid and the table; the saved latent is the one
    that regenerates the saved image; no temporary file is left."""
    out = tmp_path / "run"
    invert_cli.main(["--model", str(tiny_sd), "--img_path", ROOT_SAMPLE, "--prompt", "a cat", "--steps", "4",
                     "--image_size", "64", "--compare", "rnri,fpi,ddim", "--workdir", str(out)])
    names = files_under(out)
    for method in ("rnri", "fpi", "ddim"):
        assert f"latents/{method}/00000-cat_1.safetensors" in names
        assert f"regenerated/{method}/00000-cat_1.png" in names
    assert {"compare/00000-cat_1.png", "compare.md", "records/00000.json", "run.json",
            "input/00000-cat_1.png"} <= set(names)
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith(".")]
    record = json.loads((out / "records/00000.json").read_text())["results"]
    assert record["ddim"]["nfe"] == 2 * 3 and record["rnri"]["nfe"] == 2 * 3 * 2  # CFG 2 latents; last step no-op
    assert all(np.isfinite(r["latent_error"]) and r["timestep"] == 751 for r in record.values())
    assert "| rnri |" in (out / "compare.md").read_text()

    from safetensors import safe_open
    with safe_open(out / "latents/rnri/00000-cat_1.safetensors", "pt") as f:
        z, meta = f.get_tensor("latent"), f.metadata()
    assert z.shape == (1, 4, 8, 8) and meta["timestep"] == "751" and meta["method"] == "rnri"
    prior = load_prior(str(tiny_sd), "cpu", torch.float32)
    uc, c = prior.embed(["", "a cat"]).chunk(2)
    with torch.no_grad():
        image = prior.decode(regenerate(prior, z, InversionConfig(steps=4), c=c, uc=uc)).clamp(-1, 1)
    saved = np.asarray(Image.open(out / "regenerated/rnri/00000-cat_1.png"), dtype=np.float32) / 127.5 - 1
    assert np.abs(image[0].permute(1, 2, 0).numpy() - saved).max() <= 1 / 127.5 + 1e-6


def test_partial_inversion_on_analytic_prior(tmp_path):
    """--start_step stops partway (t = 481 of 50 steps) and FPI with many iterations round-trips nearly exactly."""
    out = tmp_path / "run"
    invert_cli.main(["--model", "analytic", "--img_path", ROOT_SAMPLE, "--prompt", "a photo of a cat", "--method",
                     "fpi", "--iters", "40", "--start_step", "25", "--image_size", "64", "--workdir", str(out)])
    result = json.loads((out / "records/00000.json").read_text())["results"]["fpi"]
    assert result["timestep"] == 481 and result["latent_error"] < 1e-5 and result["round_trip_psnr"] > 80


@pytest.mark.parametrize("flags, message", [
    (["--img_path", "missing.png"], "image not found"),
    (["--img_path", ROOT_SAMPLE, "--method", "newton"], "unknown method"),
    (["--img_path", ROOT_SAMPLE, "--start_step", "50"], "--start_step must be below"),
    (["--img_path", ROOT_SAMPLE, "--alpha", "-1"], "'alpha' must be in"),
    (["--img_path", ROOT_SAMPLE, "--device", "tpu"], "is not a torch device"),
    (["--img_path", ROOT_SAMPLE, "--device", "meta"], "holds no data"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        invert_cli.main(["--model", "analytic", "--workdir", str(out), *flags])
    assert str(exit_.value).startswith("error: ") and message in str(exit_.value) and "\n" not in str(exit_.value)
    assert not out.exists()


def test_interrupted_latent_write_leaves_no_file(tmp_path, monkeypatch):
    """A crash while the latent is written leaves neither a partial file nor a temporary one."""
    import safetensors.torch

    def failing(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        invert_cli.main(["--model", "analytic", "--img_path", ROOT_SAMPLE, "--image_size", "64", "--steps", "3",
                         "--workdir", str(out)])
    assert not [n for n in files_under(out) if n.startswith("latents/")]


@pytest.fixture
def cuda_build_without_gpu(monkeypatch):
    """torch.accelerator as a CUDA build of torch answers on a machine without a usable GPU (a login node): it names
    cuda unless asked whether it is available. CI's CPU build answers None to both."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: None if check_available else torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


def test_default_device_without_a_usable_gpu(cuda_build_without_gpu, tmp_path):
    """The default device is cpu there, and every command that loads a model runs without --device
    (treg.commands.invert, solve.py, treg.commands.gather's Inception); --device cuda is one line."""
    import solve
    from treg import hub
    from treg.commands import gather
    assert hub.resolve_device(None) == torch.device("cpu")
    invert_cli.main(["--model", "analytic", "--img_path", ROOT_SAMPLE, "--image_size", "64", "--steps", "3",
                     "--workdir", str(tmp_path / "invert")])
    assert json.loads((tmp_path / "invert/records/00000.json").read_text())["results"]["rnri"]["nfe"] == 2 * 2 * 2
    solve.main(["--model", "analytic", "--image_size", "64", "--img_path", ROOT_SAMPLE, "--steps", "3",
                "--workdir", str(tmp_path / "runs/solve")])
    gather.main([str(tmp_path / "runs")])
    assert (tmp_path / "runs/summary.md").exists()
    for main in (invert_cli.main, solve.main):
        with pytest.raises(SystemExit, match="this machine has no cuda device"):
            main(["--model", "analytic", "--img_path", ROOT_SAMPLE, "--device", "cuda", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit):
        gather.main([str(tmp_path / "runs"), "--device", "cuda"])



def test_flag_defaults_are_the_configs(capsys):
    """The parser states InversionConfig's defaults and the official K literally (so that --help needs no torch):
    they must agree with the library's."""
    from treg.solvers.inversion import METHODS, OFFICIAL_ITERS
    args, defaults = invert_cli.parse_args(["--img_path", "x"]), InversionConfig()
    for key in ("method", "steps", "cfg_guidance", "alpha", "rnri_form", "start_step", "prompt_aware"):
        assert getattr(args, key) == getattr(defaults, key), key
    assert args.diffusers_shift == (not defaults.official_shift) and args.iters == defaults.iters
    with pytest.raises(SystemExit):
        invert_cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"one of {', '.join(METHODS)}" in out
    assert ", ".join(f"{m} {k}" for m, k in OFFICIAL_ITERS.items()) + ";" in out
