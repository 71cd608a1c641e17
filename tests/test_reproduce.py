"""treg.reproduce end to end: a fabricated Food-101 folder on the analytic prior (every method and table, FID with
a stand-in extractor, resume, cost estimate) and once on the tiny SD folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_food101
from PIL import Image

from treg import fid
from treg.commands import reproduce
from treg.runs import fmt

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--limit", "2", "--steps", "3", "--image_size", "64", "--model", "analytic", "--device", "cpu"]


def channel_stats(x):
    """A stand-in for Inception: per-channel means and standard deviations."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()


def run_reproduce(argv, capsys):
    """treg.reproduce.main in-process: (SystemExit code or None, stdout)."""
    try:
        reproduce.main([str(a) for a in argv])
        code = None
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """One reproduction on the analytic prior: 2 images per class, 3 steps, 64 px, FID from channel statistics."""
    tmp = tmp_path_factory.mktemp("paper")
    split = write_food101(tmp / "food-101")
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid, "load_inception", lambda device: channel_stats)
        printed = []
        patch.setattr("builtins.print", lambda *a, file=None, **kw: printed.append(" ".join(map(str, a)))
                      if file is None else None)
        reproduce.main([*ARGS, "--food101", str(tmp), "--out", str(out)])
    return tmp, split, out, printed


def runs_of(out):
    return {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("run.json")}


def test_cost_estimate_comes_first_and_counts_every_solve(reproduced):
    printed = reproduced[3]
    # 2 classes x 2 tasks x 7 methods + 2 mismatched-text runs x 5 text methods, 2 images each
    assert printed[0].startswith("treg.reproduce: 76 solves in 38 runs, estimated")
    assert "76 at a guessed" in printed[0]


def test_every_run_solves_the_class_test_images_with_its_settings(reproduced):
    _, split, out, _ = reproduced
    found = runs_of(out)
    assert len(found) == 38
    for name, run in found.items():
        table, cls, task, method = name.split("/")
        assert [Path(i["path"]).parent.name + "/" + Path(i["path"]).stem for i in run["images"]] == split[cls][:2]
        (solver, cfg), = run["solvers"].items()
        assert cfg["steps"] == 3 and run["args"]["task_config"].endswith(
            "super-resolution.yaml" if task == "sr16" else "gauss-deblur.yaml")
        if table == "table3":
            assert run["args"]["prompt"] == {"fried_rice": "a photography of spaghetti",
                                              "ice_cream": "a photography of macarons"}[cls]
            assert task == {"fried_rice": "gauss-deblur", "ice_cream": "sr16"}[cls]
        else:
            assert run["args"]["prompt"] == {"fried_rice": "a photography of a fried rice",
                                              "ice_cream": "a photography of an ice cream"}[cls]
    settings = lambda key: next(iter(found[key]["solvers"].values()))
    assert (settings("table12/ice_cream/sr16/treg")["use_AN"]
            and settings("table12/ice_cream/sr16/treg")["null_lr"] == 1e-3)
    assert settings("table12/ice_cream/gauss-deblur/treg")["null_lr"] == 5e-4
    assert not settings("table12/ice_cream/sr16/treg_noAN")["use_AN"]
    assert settings("table12/ice_cream/sr16/psld")["cfg_guidance"] == 0 and settings(
        "table12/ice_cream/sr16/psld_cfg")["cfg_guidance"] == 4.0
    assert settings("table12/fried_rice/sr16/p2l")["prompt_tuning"] == "first_step"
    assert not {"dps", "psld"} & {name.split("/")[-1] for name in found if name.startswith("table3")}


def test_tables_hold_our_numbers_beside_the_papers(reproduced):
    _, _, out, printed = reproduced
    md = (out / "tables.md").read_text()
    assert md in "\n".join(printed) + "\n"
    numbers = json.loads((out / "tables.json").read_text())
    for name, run in runs_of(out).items():
        table, cls, task, method = name.split("/")
        results = [next(iter(i["results"].values())) for i in run["images"]]
        m = 3 * 4 * 4 if task == "sr16" else 3 * 64 * 64  # measured values of y at 64 px
        assert numbers[name]["y_mse"] == pytest.approx(np.mean([r["residual"] ** 2 / m for r in results]), rel=1e-9)
        if table == "table12":
            solver, = run["solvers"]
            recon = [out / name / "recon" / Path(i["files"][f"recon/{solver}"]).name for i in run["images"]]
            label = [out / name / "label" / Path(i["files"]["label"]).name for i in run["images"]]
            assert numbers[name]["fid"] == pytest.approx(fid.set_metrics(recon, label, channel_stats)["fid"], rel=1e-9)
            psnr = next(iter(run["metrics_mean"].values()))["psnr"]
            paper = {"treg": "21.09 [a]", "psld_cfg": "16.47 [a]"}.get(method, "–") if task == "sr16" else "–"
            assert f"| {method} | {fmt(psnr)} | {paper} | {fmt(numbers[name]['fid'])} |" in md
    assert "| treg_noAN | " in md and "144.4 [b]" in md and "124.2 [b]" in md
    assert "- [a] " in md and "- [b] " in md and "only at ×16 SR" in md


def test_resume_solves_nothing_and_dry_run_uses_measured_times(reproduced, capsys):
    tmp, _, out, _ = reproduced
    records = {p: p.stat().st_mtime_ns for p in out.rglob("records/*.json")}
    code, printed = run_reproduce([*ARGS, "--food101", tmp, "--out", out, "--skip_existing", "--methods", "treg"],
                                  capsys)
    assert code is None and printed.startswith("treg.reproduce: 0 solves in 6 runs")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("records/*.json")} == records
    code, printed = run_reproduce([*ARGS, "--food101", tmp, "--out", out, "--dry_run"], capsys)
    assert code is None and printed.startswith("treg.reproduce: 76 solves in 38 runs") and "(76 timed" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("records/*.json")} == records


def test_dry_run_on_a_fresh_folder_writes_no_runs(food101_dir, tmp_path, capsys):
    code, printed = run_reproduce([*ARGS, "--food101", food101_dir[0], "--out", tmp_path / "out", "--dry_run"], capsys)
    assert code is None and "0 timed" in printed and "table12/ice_cream/sr16/treg: 2 of 2 images" in printed
    assert not list((tmp_path / "out").rglob("run.json"))


def test_guessed_cost_scales_with_images_and_steps(food101_dir, tmp_path, capsys):
    def minutes(*extra):
        argv = ["--food101", food101_dir[0], "--out", tmp_path / "out", "--dry_run", "--methods", "dps", *extra]
        return float(run_reproduce(argv, capsys)[1].split("estimated ")[1].split(" min")[0])
    # latent DPS: 960 UNet-pass equivalents of 0.045 s per 200-step solve; 2 classes x 2 tasks, no Table 3 run
    assert minutes("--limit", "1", "--steps", "200") == pytest.approx(4 * 960 * 0.045 / 60, abs=0.05)
    assert minutes("--limit", "2", "--steps", "100") == pytest.approx(4 * 960 * 0.045 / 60, abs=0.05)
    assert minutes("--limit", "3", "--steps", "100") == pytest.approx(1.5 * 4 * 960 * 0.045 / 60, abs=0.05)


@pytest.mark.parametrize("case", ["missing class", "unknown method"])
def test_bad_input_is_one_line(food101_dir, tmp_path, capsys, case):
    root = food101_dir[0]
    argv = [*ARGS, "--food101", root, "--out", tmp_path / "out"]
    if case == "missing class":
        meta = json.loads((root / "meta/test.json").read_text())
        del meta["fried_rice"]
        (root / "meta/test.json").write_text(json.dumps(meta))
    else:
        argv += ["--methods", "treg,ddpm"]
    code, _ = run_reproduce(argv, capsys)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code
    assert ("fried_rice" if case == "missing class" else "ddpm") in code
    assert not (tmp_path / "out").exists()


def test_reproduce_on_the_tiny_sd(tiny_sd, food101_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed = run_reproduce(["--food101", food101_dir[0], "--out", out, "--limit", "1", "--steps", "2",
                                   "--image_size", "64", "--model", tiny_sd, "--device", "cpu",
                                   "--methods", "treg,p2l"], capsys)
    assert code is None
    found = runs_of(out)
    assert len(found) == 12 and all(len(run["images"]) == 1 for run in found.values())
    assert all(next(iter(r["images"][0]["results"].values()))["calls"]["unet"] > 0 for r in found.values())
    md = (out / "tables.md").read_text()
    assert md.count("| treg | ") == 6 and md.count("| p2l | ") == 6


def test_two_process_accelerate_run_shards_every_run_and_matches_one_process(reproduced, tmp_path):
    tmp, _, single, _ = reproduced
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "treg", "reproduce",
           *ARGS, "--food101", str(tmp), "--out", str(out), "--methods", "treg"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("treg.reproduce: 12 solves in 6 runs") == 1  # the estimate, from the main process
    found = runs_of(out)
    assert len(found) == 6 and (out / "tables.md").exists()
    for name, run in found.items():
        assert [(i["index"], i["process"]) for i in run["images"]] == [(0, 0), (1, 1)]
        pngs = sorted((out / name / "recon").glob("*.png"))
        assert len(pngs) == 2
        for png in pngs:  # the same images as the one-process run
            assert np.array_equal(np.asarray(Image.open(png)),
                                  np.asarray(Image.open(single / name / "recon" / png.name)))


def test_pixel_baselines_run_on_the_pixel_model_only(food101_dir, tmp_path, capsys):
    """ddrm and pigdm are skipped with a note without --pixel_model, and run on it (not on --model) with one."""
    argv = [*ARGS, "--food101", food101_dir[0], "--out", tmp_path / "out", "--methods", "treg,ddrm,pigdm"]
    code, printed = run_reproduce([*argv, "--dry_run"], capsys)
    assert code is None and "ddrm" not in printed and "pigdm" not in printed
    args = reproduce.parse_args([str(a) for a in [*argv, "--pixel_model", "analytic-pixel"]])
    runs = reproduce.plan(args)
    assert {r["method"] for r in runs} == {"treg", "ddrm", "pigdm"}
    models = {r["method"]: reproduce.argv_for(args, r, ["psnr"])[1] for r in runs}
    assert models == {"treg": "analytic", "ddrm": "analytic-pixel", "pigdm": "analytic-pixel"}


def test_every_method_names_a_solver_yaml_of_a_registered_solver():
    """reproduce names its methods without importing the solvers (so --help needs no torch): each must exist."""
    from treg.config import CONFIGS, load_solver
    from treg.solvers import SOLVERS
    for name, (yaml_name, _, _, _) in reproduce.METHODS.items():
        solver, _ = load_solver(CONFIGS / "solver" / f"{yaml_name}.yaml", SOLVERS)
        assert solver in SOLVERS, name
    assert set(reproduce.PIXEL_METHODS) <= set(SOLVERS)
