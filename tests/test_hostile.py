"""Hostile input, group by group: every bad value ends in one readable line and a non-zero exit, before any model
loads where that is possible, and leaves no file behind; a NaN stops the run naming the method and the step."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import solve
from treg.analytic import AnalyticPrior
from treg.prior import PriorUnavailable, load_prior

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
        monkeypatch.setattr(solve, "available_memory", lambda device: 16 * 2 ** 30)
    code, workdir = run(tmp_path, *flags)
    if code == 2:  # argparse's own errors: one line on stderr, exit 2
        return
    assert_one_line_error(code, expected)
    assert not workdir.exists()


def test_argparse_errors_are_one_line(tmp_path, capsys):
    code, _ = run(tmp_path, "--steps", "many")
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --steps: invalid int value")


def test_memory_estimate_scales_with_pixels_and_batch():
    prior = AnalyticPrior.from_folder()
    assert solve.memory_needed(prior, 1024, 2) == 8 * solve.memory_needed(prior, 512, 1)


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

def test_bad_image_in_a_folder_fails_before_the_first_solve(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(CAT, folder / "a.jpg")
    (folder / "b.png").write_text("not an image")
    code, workdir = run(tmp_path, "--img_path", folder)
    assert_one_line_error(code, "cannot read image", "b.png")
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
