"""solve.py end to end on the tiny offline SD, and its handling of bad input."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import solve
from treg import runs

ROOT = Path(__file__).resolve().parent.parent
TASKS = sorted((ROOT / "configs/task").glob("*.yaml"))


def solver_yaml(tmp_path, name="treg", **changes):
    """A copy of configs/solver/<name>.yaml with some fields changed (e.g. fewer steps for speed)."""
    data = yaml.safe_load((ROOT / f"configs/solver/{name}.yaml").read_text())
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("task", TASKS, ids=[t.stem for t in TASKS])
def test_solve_end_to_end_in_subprocess(task, tiny_sd, tmp_path):
    workdir = tmp_path / "out"
    cmd = [sys.executable, "solve.py", "--model", str(tiny_sd), "--task_config", str(task), "--image_size", "64",
           "--solver_config", str(solver_yaml(tmp_path, steps=9)), "--img_path", "samples/cat_1.jpg",
           "--null_prompt", "out of focus, depth of field", "--prompt", "a photo of a cat", "--cfg_guidance", "5.0",
           "--null_lr", "1e-3", "--use_AN", "--workdir", str(workdir), "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in ("input", "label", "recon", "ypred"):
        image = np.asarray(Image.open(workdir / folder / "00000-a photo of a cat.png"))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    record = json.loads((workdir / "run.json").read_text())
    assert record["task"]["image_size"] == 64 and record["solvers"]["treg"]["use_AN"] is True
    assert record["solvers"]["treg"]["cfg_guidance"] == 5.0 and record["solvers"]["treg"]["null_lr"] == 1e-3
    result = record["images"][0]["results"]["treg"]
    assert np.isfinite(result["residual"]) and result["calls"]["unet"] == 9 and result["calls"]["clip_image"] == 3
    assert result["nfe"] == 18  # CFG: two noise predictions per step
    assert set(result["metrics"]) == {"psnr", "ssim"} and record["metrics_mean"]["treg"]["images"] == 1


def run_main(argv):
    """solve.main in-process; returns SystemExit's code (None on success)."""
    try:
        solve.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code
    return None


def bad_input_cases(tmp_path):
    bad_task = tmp_path / "unknown-op.yaml"
    bad_task.write_text("operator: warp\nparams: {}\nnoise_scale: 0.01\nimage_size: 64\n")
    extra_key = tmp_path / "extra-key.yaml"
    extra_key.write_text("operator: blur\nparams: {kernel: gaussian, kernel_size: 5, std: 1.0}\n"
                         "noise_scale: 0.01\nimage_size: 64\nnoise: gaussian\n")
    bad_param = tmp_path / "bad-param.yaml"
    bad_param.write_text("operator: super_resolution\nparams: {factor: 4}\nnoise_scale: 0.01\nimage_size: 64\n")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("operator: blur\nparams: {kernel: [gaussian\n")
    not_image = tmp_path / "broken.png"
    not_image.write_text("not a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    sr = ROOT / "configs/task/super-resolution.yaml"
    cat = ROOT / "samples/cat_1.jpg"
    return {
        "missing image": (sr, tmp_path / "nope.jpg", "analytic", "image not found"),
        "unreadable image": (sr, not_image, "analytic", "cannot read image"),
        "unknown operator": (bad_task, cat, "analytic", "unknown operator"),
        "unknown config key": (extra_key, cat, "analytic", "unknown key(s) noise"),
        "unknown operator parameter": (bad_param, cat, "analytic", "factor"),
        "malformed yaml": (malformed, cat, "analytic", "malformed YAML"),
        "empty folder": (sr, empty, "analytic", "no images"),
        "missing model": (sr, cat, str(tmp_path / "no-such-model"), "no-such-model' does not exist"),
    }


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "unknown operator", "unknown config key",
                                  "unknown operator parameter", "malformed yaml", "empty folder", "missing model"])
def test_bad_input_exits_with_one_line_and_writes_nothing(case, tmp_path):
    task, image, model, expected = bad_input_cases(tmp_path)[case]
    workdir = tmp_path / "out"
    code = run_main(["--task_config", task, "--img_path", image, "--model", model, "--workdir", workdir,
                     "--image_size", 64, "--device", "cpu"])
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert expected in code, code
    assert not workdir.exists()


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "solve.py", "--img_path", str(tmp_path / "nope.jpg"), "--model",
                           "analytic", "--workdir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: image not found: {tmp_path / 'nope.jpg'}"


def test_flag_for_a_field_the_solver_lacks_is_an_error(tmp_path):
    code = run_main(["--solver_config", ROOT / "configs/solver/ddim.yaml", "--null_lr", 1e-3, "--img_path",
                     ROOT / "samples/cat_1.jpg", "--model", "analytic", "--workdir", tmp_path / "out"])
    assert "--null_lr does not apply to solver 'ddim'" in code


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "a/b\\c", "x" * 500, "café ☕ über", "..", ""])
def test_output_names_stay_inside_workdir(prompt, tmp_path):
    name = runs.slug(prompt)
    path = (tmp_path / "recon" / f"00000-{name}.png").resolve()
    assert path.parent == (tmp_path / "recon").resolve()
    assert 0 < len(name) <= 80 and "/" not in name and "\\" not in name and not name.startswith(".")


def test_help_renders_the_examples_as_written(capsys):
    with pytest.raises(SystemExit):
        solve.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--img_path samples/cat_1.jpg \\\n" in out and "--steps STEPS" in out


def test_help_and_bad_flags_answer_before_torch_loads():
    """--help, and a flag argparse refuses, exit before torch is imported (2-5 s), for solve.py and each command
    that a user types; one fresh interpreter checks them all."""
    code = """
import sys
import solve
import treg.__main__ as dispatcher
for main, argv in [(solve.main, ["--help"]), (solve.main, ["--stepz", "3"]), (dispatcher.main, ["--help"]),
                   *((dispatcher.main, [name, "--help"]) for name in dispatcher.COMMANDS),
                   (dispatcher.main, ["bench"])]:
    try:
        main(argv)
    except SystemExit:
        pass
loaded = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
print("LOADED", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout[-500:]


BENCH_HELP = {  # a few flags each benchmark's --help must list, and phrases of its description (bed, columns)
    "accuracy": ["--tasks", "--solvers", "--set", "--cfg_guidance", "prompt acc.", "exact posterior weight"],
    "calibration": ["--solvers", "--variants", "--guidance", "--null_repeats", "residual W1", "Bonferroni"],
    "fast": ["--methods", "--tasks", "--noise_scale", "within-mode", "Wilson interval"],
    "inversion": ["--steps", "--seeds_ws", "--skip_warm_start", "--device", "Round trip", "Warm start"],
    "speed": ["--model", "--components", "--compose", "--outside_from", "peak memory"],
    "gpu": ["--model", "--dtypes", "--budget_s", "--compile_backend", "host syncs", "smoke form"],
    "particles": ["--particles", "--particle_budget", "--steps", "--chunk", "final ESS", "exact posterior"],
    "deepinv": ["--samplers", "--seeds", "--permutations", "DecomposablePhysics", "Bonferroni", "one-line error"],
}


def test_bench_help_and_bad_flags_answer_before_torch_loads():
    """`python -m treg bench NAME --help` prints the benchmark's description and flags, and a flag argparse refuses
    exits 2 with argparse's message, before torch, diffusers, transformers or accelerate is imported: one fresh
    interpreter runs both for every benchmark."""
    from treg.commands.bench import BENCHMARKS
    assert set(BENCH_HELP) == set(BENCHMARKS)
    code = """
import contextlib, io, json, sys
import treg.__main__ as dispatcher
seen = {}
for name in sys.argv[1:]:
    for flag in ("--help", "--nope"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                dispatcher.main(["bench", name, flag])
                status = "returned"
            except SystemExit as stop:
                status = stop.code
        seen[name, flag] = status, out.getvalue(), err.getvalue()
loaded = sorted(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules)
print(json.dumps({"loaded": loaded, "seen": [[*key, *value] for key, value in seen.items()]}))
"""
    done = subprocess.run([sys.executable, "-c", code, *BENCH_HELP], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    seen = {(name, flag): (status, out, err) for name, flag, status, out, err in result["seen"]}
    for name, wanted in BENCH_HELP.items():
        status, out, _ = seen[name, "--help"]
        assert status == 0 and out.startswith(f"usage: python -m treg bench {name} "), (name, out[:300])
        listed = re.findall(r"^  (--\w+)", out, re.M)  # the options section, not a mention in other help text
        text = " ".join(out.split())  # argparse wraps the description's lines
        assert [w for w in wanted if w not in (listed if w.startswith("--") else text)] == [], name
        status, out, err = seen[name, "--nope"]
        assert status == 2 and "unrecognized arguments: --nope" in err and not out, (name, err[-300:])
    assert result["loaded"] == []


def test_help_names_every_dataset(capsys):
    from treg.datasets import FOLDER_DATASETS
    with pytest.raises(SystemExit):
        solve.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in ("food", *FOLDER_DATASETS))
