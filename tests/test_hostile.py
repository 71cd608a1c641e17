"""Hostile input, group by group: every bad value ends in one readable line and a non-zero exit, before any model
loads where that is possible, and leaves no file behind; a NaN stops the run naming the method and the step."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import solve
from treg import profiling
from treg.priors.analytic import AnalyticPrior
from treg.priors.base import PriorUnavailable
from treg.priors.load import load_prior

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "samples/cat_1.jpg"


def run(tmp_path, *extra, model="analytic", workdir=None, steps=3):
    """solve.main on the analytic prior at 64² with 3 steps; returns (exit message or None, workdir)."""
    workdir = workdir or tmp_path / "out"
    argv = ["--model", model, "--img_path", CAT, "--image_size", 64, "--workdir", workdir, "--device", "cpu",
            *(["--steps", steps] if steps else []), *extra]
    try:
        solve.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code, workdir
    return None, workdir


def assert_one_line_error(code, *expected):
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    for text in expected:
        assert text in code, code


def yaml_file(tmp_path, base, **changes):
    data = yaml.safe_load((ROOT / base).read_text())
    data.update(changes)
    path = tmp_path / Path(base).name
    path.write_text(yaml.safe_dump(data))
    return path


# --- config values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("cfg_guidance", float("nan"), "'cfg_guidance' must be a finite number"),
    ("cg_lamb", float("inf"), "'cg_lamb' must be a finite number"),
    ("cfg_guidance", 1e300, "'cfg_guidance' must be in [0, 100]"),
    ("null_lr", -1e-3, "'null_lr' must be in [0, 1]"),
    ("cg_lamb", 0.0, "'cg_lamb' must be in (0, 1e+06]"),
    ("steps", 0, "'steps' must be in [1, 1000]"),
    ("steps", 5000, "'steps' must be in [1, 1000]"),
    ("steps", 2.5, "'steps' must be int"),
    ("use_AN", "yes", "'use_AN' must be bool"),
    ("dc_every", None, "'dc_every' must be int"),
])
def test_solver_config_values(tmp_path, field, value, expected):
    code, workdir = run(tmp_path, "--solver_config", yaml_file(tmp_path, "configs/solver/treg.yaml", **{field: value}),
                        steps=None)
    assert_one_line_error(code, expected)
    assert not workdir.exists()


@pytest.mark.parametrize("change, expected", [
    ({"noise_scale": float("nan")}, "'noise_scale' must be a finite number"),
    ({"noise_scale": -0.1}, "'noise_scale' must be in [0, 10]"),
    ({"noise_scale": 1e30}, "'noise_scale' must be in [0, 10]"),
    ({"operator": ["blur"]}, "'operator' must be str"),
    ({"params": None}, "'params' must be dict"),
    ({"operator": "blur", "params": {"kernel": "motion", "kernel_size": 61, "intensity": 0.5, "seed": 1.5}},
     "'seed' must be int, got 1.5"),
    ({"operator": "blur", "params": {"kernel": "motion", "kernel_size": 61, "intensity": 0.5, "seed": None}},
     "'seed' must be int, got None"),
    ({"operator": "blur", "params": {"kernel": "gaussian", "kernel_size": 10 ** 6, "std": 5.0}}, "kernel_size"),
    ({"operator": "blur", "params": {"kernel": "gaussian", "kernel_size": 61, "std": 1e-300}}, "std must be in"),
    ({"operator": "inpainting", "params": {"mask": "box", "size": float("inf")}}, "'size' must be a finite"),
    ({"operator": "inpainting", "params": {"mask": "box", "size": -1e308}}, "size must be a fraction in (0, 1]"),
])
def test_task_config_values(tmp_path, change, expected):
    code, workdir = run(tmp_path, "--task_config",
                        yaml_file(tmp_path, "configs/task/super-resolution.yaml", **change))
    assert_one_line_error(code, expected)
    assert not workdir.exists()


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\x00solver: treg", "is not UTF-8"),
    (b"solver: treg\nsteps: " + b"9" * 5000, "unreadable YAML"),
    (b"- a\n- b\n", "must hold a mapping"),
    (b"solver: [treg]\n", "'solver' must be one of"),
])
def test_unreadable_config_files(tmp_path, content, expected):
    path = tmp_path / "solver.yaml"
    path.write_bytes(content)
    code, workdir = run(tmp_path, "--solver_config", path, steps=None)
    assert_one_line_error(code, expected)
    assert not workdir.exists()


def test_steps_beyond_the_models_training_steps(tmp_path, monkeypatch):
    """The bound is the loaded model's schedule length, checked before any image is solved."""
    real = AnalyticPrior.from_folder

    def short_schedule(*args, **kwargs):
        prior = real(*args, **kwargs)
        prior.alphas_cumprod = prior.alphas_cumprod[:100]
        return prior
    monkeypatch.setattr(AnalyticPrior, "from_folder", short_schedule)
    code, workdir = run(tmp_path, steps=200)
    assert_one_line_error(code, "steps 200 exceeds the model's 100 training steps")
    assert not workdir.exists()


# --- CLI values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--device", "tpu"], "is not a torch device"),
    (["--device", "meta"], "--device meta holds no data"),
    (["--device", "mps" if not torch.backends.mps.is_available() else "xpu:99"], "this machine has no"),
    (["--seed", -1], "--seed must be in [0, 9223372036854775807]"),
    (["--seed", 2 ** 64], "--seed must be in"),
    (["--limit", 0], "--limit must be at least 1"),
    (["--limit", -1], "--limit must be at least 1"),
    (["--batch_size", 0], "--batch_size must be in"),
    (["--image_size", 24], "divisible by scale"),
    (["--task_config", ROOT / "configs/task/inpainting.yaml", "--image_size", 36], "multiple of 8"),
    (["--task_config", ROOT / "configs/task/inpainting.yaml", "--image_size", 8], "ssim needs images of at least 11"),
    (["--image_size", 8192], "GiB"),
    (["--steps", "many"], "invalid int value"),
    (["--compare", "treg,nope"], "no nope.yaml in"),
    (["--compare", "treg,treg"], "given twice"),
    (["--compare", "treg,../solver/dps"], "not paths"),
    (["--metrics", "psnr,fid"], "unknown metric"),
])
def test_cli_values(tmp_path, flags, expected, monkeypatch):
    if flags[-1] == 8192:  # the memory check refuses what the machine cannot hold, whatever the machine
        monkeypatch.setattr(profiling, "available_memory", lambda device: 16 * 2 ** 30)
    code, workdir = run(tmp_path, *flags)
    if code == 2:  # argparse's own errors: one line on stderr, exit 2
        return
    assert_one_line_error(code, expected)
    assert not workdir.exists()


@pytest.mark.parametrize("flags, expected", [
    (["--steps", 0], "--steps: 'steps' must be in [1, 1000], got 0"),
    (["--cfg_guidance", "nan"], "--cfg_guidance: 'cfg_guidance' must be a finite number, got nan"),
    (["--cfg_guidance", 101], "--cfg_guidance: 'cfg_guidance' must be in [0, 100], got 101"),
    (["--compare", "treg,dps", "--steps", 0], "--steps: 'steps' must be in [1, 1000], got 0"),
])
def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_yaml(tmp_path, flags, expected):
    code, workdir = run(tmp_path, *flags, steps=None)
    assert_one_line_error(code, expected)
    assert ".yaml" not in code and not workdir.exists()


def test_an_abbreviated_flag_is_refused(tmp_path, capsys):
    """argparse would take --cfg for --cfg_guidance (prefix matching)."""
    code, workdir = run(tmp_path, "--cfg", 5)
    assert code == 2 and "unrecognized arguments: --cfg 5" in capsys.readouterr().err
    assert not workdir.exists()


def test_argparse_errors_are_one_line(tmp_path, capsys):
    code, _ = run(tmp_path, "--steps", "many")
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --steps: invalid int value")


def test_memory_estimate_scales_with_pixels_and_batch():
    prior = AnalyticPrior.from_folder()
    assert profiling.memory_needed(prior, 1024, 2) == 8 * profiling.memory_needed(prior, 512, 1)


# --- the workdir ----------------------------------------------------------------------------------------------------

def test_workdir_that_is_a_file_or_inside_one(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    for workdir in (blocker, blocker / "sub"):
        code, _ = run(tmp_path, workdir=workdir)
        assert_one_line_error(code, "is a file, not a folder")
    assert blocker.read_text() == "keep me"


def test_workdir_dangling_symlink(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    code, _ = run(tmp_path, workdir=link / "out")
    assert_one_line_error(code, "is a symlink to a missing target")
    assert not (tmp_path / "missing").exists()


def test_workdir_name_too_long(tmp_path):
    code, _ = run(tmp_path, workdir=tmp_path / ("w" * 300))
    assert_one_line_error(code, "too long for the file system")


def test_read_only_workdir(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway; what a user sees comes from os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)
    try:
        code, _ = run(tmp_path, workdir=folder / "out")
    finally:
        folder.chmod(0o700)
    assert_one_line_error(code, "is not writable")
    assert list(folder.iterdir()) == []


def test_a_folder_in_the_way_of_an_output_leaves_the_image_absent(tmp_path):
    workdir = tmp_path / "out"
    (workdir / "records" / "00000.json").mkdir(parents=True)
    code, _ = run(tmp_path, workdir=workdir)
    assert_one_line_error(code, "00000.json", "a folder is in the way")
    assert sorted(p.name for p in workdir.rglob("*")) == ["00000.json", "records"]


def test_corrupt_and_foreign_records_are_skipped_with_a_warning(tmp_path):
    workdir = tmp_path / "out"
    (workdir / "records").mkdir(parents=True)
    (workdir / "records" / "00007.json").write_text("{truncated")
    (workdir / "records" / "00008.json").write_text(json.dumps({"index": 8, "something": "else"}))
    (workdir / "records" / "00009.json").write_bytes(b"\xff\xfe")
    with pytest.warns(UserWarning, match="skipping .*0000[789].json: not a record"):
        code, _ = run(tmp_path, workdir=workdir)
    assert code is None
    report = json.loads((workdir / "run.json").read_text())
    assert [r["index"] for r in report["images"]] == [0] and report["metrics_mean"]["treg"]["images"] == 1


# --- models ---------------------------------------------------------------------------------------------------------

def test_checkpoint_with_missing_weights_is_an_error(tiny_sd, tmp_path):
    broken = tmp_path / "broken-sd"
    shutil.copytree(tiny_sd, broken)
    weights = next((broken / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(PriorUnavailable, match="does not match its weights: 1 missing keys") as err:
        load_prior(str(broken), "cpu", torch.float32)
    assert "\n" not in str(err.value)
    code, workdir = run(tmp_path, model=broken)
    assert_one_line_error(code, "text_encoder of the model", "missing keys")
    assert not workdir.exists()


@pytest.mark.parametrize("model, expected", [
    ("./no/such/folder", "does not exist"),
    ("nobody-xyz/no-such-model", "hf download nobody-xyz/no-such-model"),
    ("not a valid id!", "neither an existing folder nor a valid hub id"),
])
def test_missing_model_is_one_line_and_fast(tmp_path, model, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, workdir = run(tmp_path, model=model)
    assert_one_line_error(code, expected)
    assert not workdir.exists()


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    """Online but without a network: one request, one line, no retries (the hub client is made to fail fast)."""
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    code, _ = run(tmp_path, model="nobody-xyz/no-such-model")
    assert_one_line_error(code, "the hub cannot be reached", "hf download nobody-xyz/no-such-model")


# --- images ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("b.png", b"not an image", "cannot identify image file"),
    ("b.jpg", CAT.read_bytes()[: CAT.stat().st_size // 2], "image file is truncated"),  # an intact header
])
def test_bad_image_in_a_folder_fails_before_the_first_solve(tmp_path, name, content, expected):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(CAT, folder / "a.jpg")
    (folder / name).write_bytes(content)
    code, workdir = run(tmp_path, "--img_path", folder)
    assert_one_line_error(code, "cannot read image", name, expected)
    assert not workdir.exists()


def test_decompression_bomb_on_the_command_line(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, workdir = run(tmp_path)
    assert_one_line_error(code, "decompression bomb")
    assert not workdir.exists()


# --- numerical failure ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["treg", "dps", "reddiff"])
def test_nan_stops_the_run_naming_method_and_step(tmp_path, monkeypatch, solver):
    """A prior that turns to NaN at its 3rd noise prediction: the run stops at that step and writes nothing."""
    real, calls = AnalyticPrior.eps, []

    def failing(self, z, t, e):
        calls.append(t)
        out = real(self, z, t, e)
        return out * float("nan") if len(calls) >= 3 else out
    monkeypatch.setattr(AnalyticPrior, "eps", failing)
    code, workdir = run(tmp_path, "--solver_config", ROOT / f"configs/solver/{solver}.yaml", "--cfg_guidance", 0,
                        steps=5)
    assert_one_line_error(code, f"{solver} produced NaN or inf at step")
    assert not workdir.exists() or not any(p.is_file() for p in workdir.rglob("*"))


# --- task parameters at and beyond their edges ----------------------------------------------------------------------

def _gauss(**p):
    return "blur", {"kernel": "gaussian", **p}


def _motion(**p):
    return "blur", {"kernel": "motion", **p}


def _box(**p):
    return "inpainting", {"mask": "box", **p}


def _random(**p):
    return "inpainting", {"mask": "random", **p}


# (operator and params, image size): the smallest image each takes (8, or 16 for ×16 SR), values at their limits
EDGES = [
    (("super_resolution", {"scale": 4}), 8), (("super_resolution", {"scale": 8}), 8),
    (("super_resolution", {"scale": 16}), 16),  # y is 1×1
    (_gauss(kernel_size=1, std=1.0), 16), (_gauss(kernel_size=3, std=0.01), 16), (_gauss(kernel_size=3, std=1e4), 16),
    (_motion(kernel_size=1, intensity=0.0, seed=0), 16), (_motion(kernel_size=1, intensity=1.0, seed=0), 16),
    (_motion(kernel_size=3, intensity=0.5, seed=2 ** 63 - 1), 16),
    (_box(size=1), 8), (_box(size=2), 8), (_box(size=8), 8), (_box(size=1.0), 8), (_box(size=2, top=0, left=0), 8),
    (_box(size=2, top=6, left=6), 8), (_box(size=2, margin=0), 8), (_box(size=2, margin=3, seed=5), 8),
    (_random(drop=0.0), 8), (_random(drop=1.0), 8), (_random(drop=1 / 64), 8),
    (("inpainting", {"mask": "MASK"}), 8),  # a 1×1 mask image, all missing
]
OUTSIDE = [
    (("super_resolution", {"scale": 2}), 16, "scale must be one of (4, 8, 16)"),
    (("super_resolution", {"scale": 16.0}), 16, "'scale' must be int"),
    (("super_resolution", {"scale": True}), 16, "'scale' must be int"),
    (("super_resolution", {"scale": 16}), 24, "divisible by scale"),
    (("super_resolution", {}), 16, "missing a required argument: 'scale'"),
    (_gauss(kernel_size=0, std=1.0), 16, "odd integer in [1, 1025], got 0"),
    (_gauss(kernel_size=2, std=1.0), 16, "odd integer in [1, 1025], got 2"),
    (_gauss(kernel_size=1027, std=1.0), 16, "odd integer in [1, 1025], got 1027"),
    (_gauss(kernel_size=5.0, std=1.0), 16, "'kernel_size' must be int"),
    (_gauss(kernel_size=5, std=0.0099), 16, "std must be in [0.01, 10000]"),
    (_gauss(kernel_size=5, std=1.0001e4), 16, "std must be in [0.01, 10000]"),
    (_gauss(kernel_size=5, std=float("nan")), 16, "'std' must be a finite float"),
    (_gauss(kernel_size=5, std=1.0, seed=0), 16, "unknown parameter(s) seed"),
    (_motion(kernel_size=3, intensity=-0.1, seed=0), 16, "intensity must be in [0, 1]"),
    (_motion(kernel_size=3, intensity=1.1, seed=0), 16, "intensity must be in [0, 1]"),
    (_motion(kernel_size=3, intensity=float("inf"), seed=0), 16, "'intensity' must be a finite float"),
    (_motion(kernel_size=3, intensity=0.5, seed=-1), 16, "seed must be a non-negative integer"),
    (_motion(kernel_size=-1, intensity=0.5, seed=0), 16, "odd integer in [1, 1025], got -1"),
    (_motion(kernel_size=3, intensity=0.5), 16, "missing a required argument: 'seed'"),
    (("blur", {"kernel": "box", "kernel_size": 3}), 16, "unknown blur kernel 'box'"),
    (_box(size=0), 8, "size must be a fraction in (0, 1] or pixels in [1, 8]"),
    (_box(size=9), 8, "pixels in [1, 8], got 9"),
    (_box(size=1.5), 8, "pixels in [1, 8], got 1.5"),
    (_box(size=0.01), 8, "box of size 0"),  # rounds to no pixel at 8²
    (_box(size=True), 8, "'size' must be a finite int"),
    (_box(size=2, top=7, left=6), 8, "does not fit a 8×8 image"),
    (_box(size=2, top=-1, left=0), 8, "does not fit a 8×8 image"),
    (_box(size=2, top=1), 8, "give both top and left"),
    (_box(size=2, margin=4), 8, "does not fit 4 pixels inside"),
    (_box(size=2, margin=0, seed=-1), 8, "seed must be a non-negative integer"),
    (_random(drop=-0.1), 8, "drop must be in [0, 1]"),
    (_random(drop=1.1), 8, "drop must be in [0, 1]"),
    (_random(drop=float("nan")), 8, "'drop' must be a finite float"),
    (_random(drop=0.5, seed=-1), 8, "seed must be a non-negative integer"),
    (("inpainting", {"mask": "NOT_AN_IMAGE"}), 8, "a readable image file"),
    (("inpainting", {"mask": "MISSING"}), 8, "No such file or directory"),
    (("inpainting", {"mask": 5}), 8, "'mask' must be str"),
    (("warp", {}), 16, "unknown operator 'warp'"),
]


def task_file(tmp_path, operator, params, size, noise_scale=0.01):
    from PIL import Image
    Image.new("L", (1, 1), 0).save(tmp_path / "mask.png")
    (tmp_path / "text.png").write_text("not an image")
    named = {"MASK": tmp_path / "mask.png", "NOT_AN_IMAGE": tmp_path / "text.png", "MISSING": tmp_path / "no.png"}
    params = {k: str(named[v]) if isinstance(v, str) and v in named else v for k, v in params.items()}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"operator": operator, "params": params, "noise_scale": noise_scale,
                                    "image_size": size}))
    return path


def complete_run(workdir):
    """Each kind of output once, the record and the reports; no temporary file."""
    names = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
    return names == ["input/00000-no-prompt.png", "label/00000-no-prompt.png", "metrics.csv",
                     "recon/00000-no-prompt.png", "records/00000.json", "run.json", "ypred/00000-no-prompt.png"]


@pytest.mark.parametrize("case, size", EDGES, ids=[f"{op}-{p}-{n}" for (op, p), n in EDGES])
def test_task_parameters_at_their_edges_solve(tmp_path, case, size, one_thread):
    """Every accepted edge value runs to the end (2 steps, treg, cfg on): complete outputs, a finite residual."""
    code, workdir = run(tmp_path, "--task_config", task_file(tmp_path, *case, size), "--image_size", size,
                        "--metrics", "psnr", steps=2)
    assert code is None
    assert complete_run(workdir)
    result = json.loads((workdir / "run.json").read_text())["images"][0]["results"]["treg"]
    assert math.isfinite(result["residual"])


@pytest.mark.parametrize("case, size, expected", OUTSIDE, ids=[f"{op}-{p}-{n}" for (op, p), n, _ in OUTSIDE])
def test_task_parameters_outside_their_edges_are_one_line(tmp_path, case, size, expected):
    code, workdir = run(tmp_path, "--task_config", task_file(tmp_path, *case, size), "--image_size", size,
                        "--metrics", "psnr", steps=2)
    assert_one_line_error(code, expected)
    assert not workdir.exists()


@pytest.mark.parametrize("solver", ["ddrm", "pigdm", "cci", "psld"])
@pytest.mark.parametrize("case, size, noise", [
    (("super_resolution", {"scale": 16}), 16, 0.0), (_gauss(kernel_size=1, std=1.0), 16, 10.0),
    (_random(drop=1.0), 8, 0.01), (_box(size=1), 8, 0.0)])
def test_edges_through_the_other_solvers(tmp_path, solver, case, size, noise, one_thread):
    """The solvers that use the operator's SVD, pseudo-inverse or gradient at the edges, and noise_scale 0 and 10."""
    code, workdir = run(tmp_path, "--task_config", task_file(tmp_path, *case, size, noise_scale=noise), "--image_size",
                        size, "--metrics", "psnr", "--solver_config", ROOT / f"configs/solver/{solver}.yaml", steps=2)
    assert code is None and complete_run(workdir)


@pytest.mark.parametrize("kernel", [{"kernel": "gaussian", "kernel_size": 1, "std": 3.0},
                                    {"kernel": "motion", "kernel_size": 1, "intensity": 0.5, "seed": 0}])
def test_a_one_tap_blur_is_the_identity(kernel):
    """Issue 16 §12: kernel_size 1 ended in an IndexError. A normalised 1×1 kernel is [[1]]: A = Aᵀ = A⁺ = I."""
    from treg.operators import build_operator
    op = build_operator("blur", 16, **kernel)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for fn in (op.A, op.At, op.pinv):
        assert torch.allclose(fn(x), x, atol=1e-6)


@pytest.mark.parametrize("kernel", [{"kernel": "gaussian", "kernel_size": 1025, "std": 1e4},
                                    {"kernel": "motion", "kernel_size": 1025, "intensity": 1.0, "seed": 0}])
def test_the_largest_blur_kernel_on_the_smallest_image(kernel):
    """kernel_size 1025 on 8²: A and Aᵀ stay adjoint (⟨Ax, y⟩ = ⟨x, Aᵀy⟩ in float64) and finite. (A whole solve
    with it costs 5 s, its motion pinv 50 s in float64: operator level only.)"""
    from treg.operators import build_operator
    op = build_operator("blur", 8, **kernel).double()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ax = op.A(x)
    assert torch.isfinite(ax).all() and ax.abs().max() > 0
    assert (ax * y).sum().item() == pytest.approx((x * op.At(y)).sum().item(), rel=1e-9, abs=1e-12)
