"""treg.commands.gather on a real 2×2 sweep (cfg_guidance × null_lr) solved in-process with the analytic prior."""
import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import solve
from treg.commands import gather

ROOT = Path(__file__).resolve().parent.parent
GRID = [(w, lr) for w in ("0", "2.5") for lr in ("5e-4", "1e-3")]   # in the order gather must sort them


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """ROOT/w{w}_lr{lr}: four solve.py runs at 64², 2 images, 6 steps, different only in w and null_lr."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = yaml.safe_load((ROOT / "configs/solver/treg.yaml").read_text()) | {"steps": 6}
    (tmp / "treg.yaml").write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and much faster on a busy machine
    try:
        for w, lr in reversed(GRID):  # solved out of order: the table's order must come from the settings
            solve.main(["--model", "analytic", "--task_config", str(ROOT / "configs/task/super-resolution.yaml"),
                        "--solver_config", str(tmp / "treg.yaml"), "--img_path", str(ROOT / "samples"),
                        "--image_size", "64", "--limit", "2", "--prompt", "a photo of a cat",
                        "--null_prompt", "out of focus, depth of field", "--cfg_guidance", w, "--null_lr", lr,
                        "--use_AN", "--workdir", str(tmp / "runs" / f"w{w}_lr{lr}")])
    finally:
        torch.set_num_threads(threads)
    return tmp / "runs"


def run_gather(argv):
    """gather.main in-process; returns SystemExit's code (None on success)."""
    try:
        gather.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code
    return None


def run_json(root, w, lr):
    return json.loads((root / f"w{w}_lr{lr}" / "run.json").read_text())


def test_summary_has_one_row_per_run_with_the_varying_settings(sweep, tmp_path, capsys):
    assert run_gather([sweep, "--out", tmp_path]) is None
    printed = capsys.readouterr().out
    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    header = list(table[0])
    assert header[:4] == ["run", "method", "cfg_guidance", "null_lr"]
    assert not {"steps", "use_AN", "prompt", "null_prompt", "model", "seed", "task_config"} & set(header)
    assert [(float(r["cfg_guidance"]), float(r["null_lr"])) for r in table] == [(float(w), float(lr)) for w, lr in GRID]
    for row, (w, lr) in zip(table, GRID):
        assert row["run"] == f"w{w}_lr{lr}" and row["method"] == "treg"
        means = run_json(sweep, w, lr)["metrics_mean"]["treg"]
        assert {"residual", "psnr", "ssim", "wall_seconds", "nfe"} <= set(row)
        for metric, value in means.items():
            assert float(row[metric]) == value, metric
    md = (tmp_path / "summary.md").read_text()
    assert "steps=6" in md and "use_AN=True" in md   # the constant settings are listed once, above the table
    body = [line for line in printed.splitlines() if line.startswith("| w")]
    assert len(body) == 4 and body[0].startswith("| w0_lr5e-4 | treg | 0 | 0.0005 |")
    assert f"{run_json(sweep, '2.5', '1e-3')['metrics_mean']['treg']['psnr']:.4g}" in body[3]
    assert "\n".join(body) in md


def test_sheet_has_ground_truth_then_one_row_per_run(sweep, tmp_path):
    # A moved copy of the sweep, with one reconstruction blacked out: the sheet must read the moved files.
    moved = tmp_path / "moved"
    shutil.copytree(sweep, moved)
    last = moved / "w2.5_lr1e-3" / "recon" / "00001-a photo of a cat.png"
    Image.new("RGB", (64, 64)).save(last)
    assert run_gather([moved]) is None
    sheet = np.asarray(Image.open(moved / "sheet.png").convert("RGB"))
    t, pad = 64, gather.PAD
    rows = [["label"] * 2] + [[f"w{w}_lr{lr}"] * 2 for w, lr in GRID]
    assert sheet.shape[0] > len(rows) * (t + pad) and sheet.shape[1] > 2 * (t + pad) + 40  # + labels on top, left
    for i, row in enumerate(rows):          # cells are laid out from the bottom-right corner
        for j, run in enumerate(row):
            y, x = sheet.shape[0] - (len(rows) - i) * (t + pad), sheet.shape[1] - (2 - j) * (t + pad)
            folder = "w0_lr5e-4/label" if run == "label" else f"{run}/recon"
            expected = np.asarray(Image.open(next((moved / folder).glob(f"0000{j}-*.png"))).convert("RGB"))
            assert np.array_equal(sheet[y:y + t, x:x + t], expected), (run, j)
    assert not sheet[-(t + pad):-pad, -(t + pad):-pad].any()   # the blacked-out copy, not the recorded original
    assert sheet[:, :40].min() < 128  # the row labels are drawn in the left margin


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_is_written(sweep, tmp_path):
    assert run_gather([sweep, "--out", tmp_path]) is None
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG" and min(plot.size) > 200


def test_plot_is_skipped_with_a_note_without_matplotlib(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run_gather([sweep, "--out", tmp_path]) is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "plot.png" in line]
    assert len(notes) == 1 and "matplotlib" in notes[0]
    assert not (tmp_path / "plot.png").exists() and (tmp_path / "sheet.png").exists()


def test_plot_is_skipped_when_x_does_not_vary(sweep, tmp_path, capsys):
    assert run_gather([sweep, "--out", tmp_path, "--x", "steps"]) is None
    assert "steps does not vary" in capsys.readouterr().err and not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("case", ["empty", "missing", "unknown metric"])
def test_bad_root_or_metric_exits_2_and_writes_nothing(case, sweep, tmp_path, capsys):
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    argv = {"empty": [root], "missing": [tmp_path / "nope"],
            "unknown metric": [sweep, "--metric", "sharpness", "--no_fid"]}[case]
    assert run_gather([*argv, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not out.exists() and not any(root.iterdir())


def test_fid_and_kid_per_run_with_an_injected_extractor(sweep, tmp_path, monkeypatch):
    from treg import fid

    def channel_stats(x):  # a stand-in for Inception: per-channel means and standard deviations
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()

    monkeypatch.setattr(fid, "load_inception", lambda device: channel_stats)
    assert run_gather([sweep, "--out", tmp_path]) is None
    with open(tmp_path / "summary.csv", newline="") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    for w, lr in GRID:
        images = run_json(sweep, w, lr)["images"]
        recon = [sweep / f"w{w}_lr{lr}" / "recon" / Path(r["files"]["recon/treg"]).name for r in images]
        label = [sweep / f"w{w}_lr{lr}" / "label" / Path(r["files"]["label"]).name for r in images]
        expected = fid.set_metrics(recon, label, channel_stats)
        assert float(table[f"w{w}_lr{lr}"]["fid"]) == pytest.approx(expected["fid"], rel=1e-6)
        assert float(table[f"w{w}_lr{lr}"]["kid"]) == pytest.approx(expected["kid"], rel=1e-6, abs=1e-12)


def test_fid_is_skipped_with_one_note_without_pytorch_fid(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    assert run_gather([sweep, "--out", tmp_path]) is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "FID/KID" in line]
    assert len(notes) == 1 and "pip install pytorch-fid" in notes[0]
    assert "fid" not in next(csv.DictReader(open(tmp_path / "summary.csv", newline="")))
