"""Prompt accuracy against the exact posterior, the demo figure, the accuracy benchmark and the README demo command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import solve
from treg.bench import accuracy as bench_accuracy, beds
from treg.commands import figure
from treg.config import load_solver, load_task
from treg.diffusion import randn
from treg.latent_ops import linear_map
from treg.operators import build_operator
from treg.priors.posterior import dense_posterior, exact_posterior, landed_component
from treg.solvers import SOLVERS
from treg.solvers.latent import residual_norm

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
NULL_PROMPT = "out of focus, depth of field"
README_FLAGS = {"cfg_guidance": 5.0, "use_AN": True, "null_lr": 1e-3}  # the official README's TReg flags


@pytest.fixture(scope="module")
def sr8():
    """The ambiguous ×8 SR case at 64 px: 3 images × 3 hidden details, truth = the cat with its own detail."""
    task = load_task(ROOT / "configs/task/super-resolution-x8.yaml", 64)
    op = build_operator(task.operator, 64, **task.params)
    prior, info, gram = beds.grid_prior(op, 64, task.noise_scale)
    assert info["kind"] == "null space" and info["visibility_over_sigma"] < 1e-6
    return task, op, prior, info, gram


def solve_seeds(sr8, n, prompt, w):
    """TReg (treg.yaml + README flags, cfg_guidance = w) on n noisy measurements of the cat, one seed each:
    returns (landed component, its exact posterior weight, residual / noise floor, posterior weights under prompt)."""
    task, op, prior, _, _ = sr8
    sigma = task.noise_scale
    x = prior.decode(prior.means(8, 8)[:1]).float().expand(n, -1, -1, -1)  # component (cat, cat)
    gens = [torch.Generator().manual_seed(100 + j) for j in range(n)]
    y = op.A(x) + sigma * randn(op.A(x).shape, gens, "cpu")
    _, cfg = load_solver(ROOT / "configs/solver/treg.yaml", SOLVERS, README_FLAGS | {"cfg_guidance": w})
    uc, c = prior.embed([NULL_PROMPT, prompt]).chunk(2)
    x_hat = SOLVERS["treg"][0](prior, op, y, cfg, c=c, uc=uc, generator=gens)
    posts = [exact_posterior(prior, op, y[j:j + 1], prompt if w else NULL_PROMPT, sigma) for j in range(n)]
    landed = [landed_component(prior, x_hat[j:j + 1], posts[j]) for j in range(n)]
    residual = residual_norm(op, y, x_hat) / (sigma * y[0].numel() ** 0.5)
    return ([k.item() for k, _ in landed], [w.item() for _, w in landed], residual,
            torch.stack([p.log_weights.exp() for p in posts]))


@pytest.mark.parametrize("k", [0, 2], ids=["true prompt", "other prompt"])
def test_treg_lands_in_the_prompted_component(sr8, k):
    _, _, prior, info, _ = sr8
    landed, weight, residual, _ = solve_seeds(sr8, 10, info["captions"][k], 5.0)
    assert sum(c == k for c in landed) >= 9, [prior.pairs[c] for c in landed]  # component (cat, k) is index k
    assert min(weight) > 0.9  # and the exact posterior under that prompt agrees that it is the likely one
    assert residual.max() < 2, residual


def test_treg_without_text_lands_where_the_posterior_puts_its_mass(sr8):
    _, _, prior, info, _ = sr8
    n = 12
    landed, weight, residual, post = solve_seeds(sr8, n, "", 0.0)
    assert all(c < 3 for c in landed), landed  # always in the measured (cat) group: consistent with y ...
    assert len(set(landed)) > 1, landed  # ... but not always on the same detail: text did not choose it
    freq = torch.tensor([sum(c == k for c in landed) / n for k in range(3)], dtype=torch.float64)
    expected = post[:, :3].mean(0)  # the exact posterior weights of the group's details (≈ π(null prompt))
    assert (expected - 1 / 3).abs().max() < 0.1
    assert (freq - expected).abs().max() < 0.35, (freq, expected)  # within ~2.5 binomial std at n = 12
    assert residual.max() < 2, residual


def test_benchmark_prior_hides_its_details_and_its_dense_posterior_is_exact(sr8):
    task, op, prior, info, gram = sr8
    mu = prior.means(8, 8).double()
    forward, _ = linear_map(prior, op)
    seen = forward(mu).view(3, 3, -1)  # (image i, detail k, ...)
    assert (seen - seen[:, :1]).abs().max() < 1e-9  # details are invisible to y ...
    assert info["separation_over_std"] > 100  # ... and far apart; the images are told apart by y
    assert (seen[0, 0] - seen[1, 0]).norm() > 10 * task.noise_scale
    x = prior.decode(mu[4:5]).float()
    y = op.A(x) + task.noise_scale * torch.randn(op.A(x).shape, generator=torch.Generator().manual_seed(3))
    dense = dense_posterior(prior, op, gram, y, "a rocket launch", task.noise_scale)
    cg = exact_posterior(prior, op, y, "a rocket launch", task.noise_scale)
    torch.testing.assert_close(dense.means, cg.means, rtol=0, atol=1e-9)
    torch.testing.assert_close(dense.log_weights.exp(), cg.log_weights.exp(), rtol=0, atol=1e-9)
    assert dense.log_weights.exp()[3:6].sum() > 0.999 and dense.log_weights.exp()[5] > 0.9  # group 1, rocket detail


def solver_yaml(tmp_path, steps):
    data = yaml.safe_load((ROOT / "configs/solver/treg.yaml").read_text()) | {"steps": steps}
    path = tmp_path / "treg-short.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_solve(tmp_path, name, prompt, w, image="samples/cat_1.jpg"):
    workdir = tmp_path / name
    argv = ["--model", "analytic", "--task_config", "configs/task/super-resolution.yaml", "--image_size", "64",
            "--solver_config", solver_yaml(tmp_path, 6), "--img_path", image, "--null_prompt", NULL_PROMPT,
            "--prompt", prompt, "--cfg_guidance", w, "--workdir", workdir, "--device", "cpu", "--metrics", "psnr"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        solve.main([str(a) for a in argv])
    finally:
        os.chdir(cwd)
    return workdir


def test_figure_composes_runs_and_rejects_bad_run_dirs(tmp_path, capsys):
    runs = [run_solve(tmp_path, "w0", "", 0), run_solve(tmp_path, "coffee", "a cup of coffee", 5)]
    out = tmp_path / "demo.png"
    figure.main([str(r) for r in runs] + ["--out", str(out), "--size", "64"])
    sheet = np.asarray(Image.open(out))
    assert sheet.shape[1] == 4 * (64 + 4) + 4 and sheet.shape[2] == 3  # measurement | 2 runs | ground truth
    top = sheet.shape[0] - 64 - 4  # tiles sit at the bottom, under the label band
    assert top > 16
    tiles = [sheet[top:top + 64, 4 + j * 68:4 + j * 68 + 64] for j in range(4)]
    png = lambda run, kind: np.asarray(Image.open(next((run / kind).glob("00000-*.png"))))
    for tile, expected in zip(tiles, [png(runs[0], "input"), png(runs[0], "recon"), png(runs[1], "recon"),
                                      png(runs[0], "label")]):
        np.testing.assert_array_equal(tile, expected)
    assert not np.array_equal(tiles[1], tiles[2])  # the two prompts gave two solutions
    assert [figure.label(r["prompt"], r["w"]) for r in map(figure.read_run, runs)] == [
        "w=0 (no text)", '"a cup of coffee" (w=5)']

    other = run_solve(tmp_path, "rocket", "a rocket launch", 5, image="samples/rocket.jpg")
    no_record = tmp_path / "empty"
    no_record.mkdir()
    for bad, message in [(tmp_path / "nope", "not a folder"), (no_record, "no run.json"),
                         (other, "ground truth differs")]:
        done = subprocess.run([sys.executable, "-m", "treg", "figure", str(runs[0]), str(bad), "--out",
                               str(tmp_path / "bad.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and not (tmp_path / "bad.png").exists()
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error:") and message in done.stderr, done.stderr


def test_bench_accuracy_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "acc"
    bench_accuracy.main(["--tasks", "super-resolution-x8", "--solvers", "treg,ddim", "--seeds", "1", "--steps", "9",
                         "--out", str(out)])
    table = (tmp_path / "acc.md").read_text()
    assert table == capsys.readouterr().out
    for column in ["residual", "prompt acc.", "landed (vs posterior)", "post. weight", "rel. L2", "NFE", "s/solve"]:
        assert column in table
    report = json.loads((tmp_path / "acc.json").read_text())
    rows = {(r["setting"], r["solver"]): r for r in report["rows"]}
    assert set(rows) == {(s, m) for s in ("w=0", "true", "other") for m in ("treg", "ddim")}
    assert rows["w=0", "treg"]["cfg_guidance"] == 0 and rows["true", "treg"]["cfg_guidance"] == 4.0
    assert rows["w=0", "treg"]["prompt_accuracy"] is None
    for setting in ("true", "other"):  # the row's accuracy is the share of its runs that landed where prompted
        mine = [r for r in report["runs"] if r["setting"] == setting and r["solver"] == "treg"]
        assert rows[setting, "treg"]["prompt_accuracy"] == sum(r["landed"] == r["prompted"] for r in mine) / len(mine)
    assert rows["true", "treg"]["prompt_accuracy"] == 1.0
    assert rows["w=0", "ddim"]["nfe"] == 9 and rows["true", "ddim"]["nfe"] == 18  # CFG evaluates 2 latents
    assert rows["w=0", "treg"]["residual"] < rows["w=0", "ddim"]["residual"]  # ddim ignores y
    assert len(report["runs"]) == 6 and {"residual", "landed", "posterior_weight", "rel_l2"} <= set(report["runs"][0])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(SOLVERS, "ddim", (broken, SOLVERS["ddim"][1]))
    bench_accuracy.main(["--tasks", "super-resolution-x8", "--solvers", "ddim", "--seeds", "1", "--out", str(out)])
    report = json.loads((tmp_path / "acc.json").read_text())
    assert [r["error"] for r in report["rows"]] == ["RuntimeError: boom"] * 3
    assert "error: RuntimeError: boom" in (tmp_path / "acc.md").read_text()
    with pytest.raises(SystemExit, match="unknown nope"):
        bench_accuracy.main(["--solvers", "nope", "--out", str(out)])


DEMO = ["solve.py", "--model", "analytic", "--task_config", "configs/task/super-resolution.yaml", "--img_path",
        "samples/cat_1.jpg", "--prompt", "a photo of a cat", "--null_prompt", NULL_PROMPT, "--cfg_guidance", "5.0",
        "--null_lr", "1e-3", "--use_AN"]


def test_readme_demo_command_runs_offline(tmp_path):
    """The first README command, verbatim, at 512² × 200 steps: ~10 s on an idle 2-core CPU, up to ~1 min when busy."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *DEMO, "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in ("input", "label", "recon", "ypred"):
        image = np.asarray(Image.open(tmp_path / folder / "00000-a photo of a cat.png"))
        assert image.shape == (512, 512, 3)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["args"]["prompt"] == "a photo of a cat" and record["solvers"]["treg"]["use_AN"] is True
    result = record["images"][0]["results"]["treg"]
    assert result["residual"] < 2 * result["noise_floor"]  # the demo prior fits the cat's measurement
    assert result["metrics"]["psnr"] > 25  # and the true prompt restores the cat's detail (28.4 dB; 22–24 without)
