"""Folders, resume, batches, compare mode and 2-process accelerate runs, on the analytic prior (fast, offline)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import solve
from treg.solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--model", "analytic", "--task_config", ROOT / "configs/task/super-resolution-x8.yaml", "--image_size", 64,
        "--img_path", ROOT / "samples", "--prompt", "a photo of a cat", "--device", "cpu"]


def solver_yaml(tmp_path, name, **changes):
    data = yaml.safe_load((ROOT / f"configs/solver/{name}.yaml").read_text())
    data.update(changes)
    folder = tmp_path / "solver-configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder / f"{name}.yaml"


def run_main(*argv):
    try:
        solve.main([str(a) for a in [*BASE, *argv]])
    except SystemExit as stop:
        return stop.code
    return None


def pngs(workdir):
    return {p.relative_to(workdir): np.asarray(Image.open(p)) for p in sorted(Path(workdir).rglob("*.png"))}


def test_limit_and_per_image_seeds(tmp_path):
    cfg = solver_yaml(tmp_path, "treg", steps=12)
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "all") is None
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "two", "--limit", 2) is None
    everything, first_two = pngs(tmp_path / "all"), pngs(tmp_path / "two")
    assert len(everything) == 4 * 4 and len(first_two) == 2 * 4
    for name, image in first_two.items():  # image i's result does not depend on what else is solved
        assert np.array_equal(image, everything[name]), name
    rows = list(csv.DictReader(open(tmp_path / "all/metrics.csv")))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:  # the table's PSNR is that of the saved images (up to their 8-bit rounding)
        label, recon = (everything[Path(kind) / f"{int(row['index']):05d}-a photo of a cat.png"] / 127.5 - 1
                        for kind in ("label", "recon"))
        mse = ((label - recon) ** 2).mean()
        assert abs(float(row["psnr"]) - 10 * np.log10(4 / mse)) < 0.05, (row["psnr"], 10 * np.log10(4 / mse))
    record = json.loads((tmp_path / "all/run.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "all").rglob("*") if p.is_file()}
    assert modes == {oct(0o666 & ~umask)}  # atomic writes keep the usual file mode, not a temp file's 0600
    mean = np.mean([float(r["psnr"]) for r in rows])
    assert record["metrics_mean"]["treg"]["psnr"] == pytest.approx(mean)


def test_interrupted_run_resumes_to_the_same_files(tmp_path, monkeypatch, capsys):
    cfg = solver_yaml(tmp_path, "treg", steps=12)
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "whole") is None

    fn, config = SOLVERS["treg"]
    calls = []

    def interrupted_on_third_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    monkeypatch.setitem(SOLVERS, "treg", (interrupted_on_third_image, config))
    code = run_main("--solver_config", cfg, "--workdir", tmp_path / "resumed")
    assert code == 130  # 128 + SIGINT, what a shell reports for Ctrl-C
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted: finished images are saved")
    partial = pngs(tmp_path / "resumed")
    assert len(partial) == 2 * 4  # two images finished, nothing half-written
    assert not [p for p in (tmp_path / "resumed").rglob(".*") if p.is_file()]  # no temporary files left
    assert len(json.loads((tmp_path / "resumed/run.json").read_text())["images"]) == 2

    monkeypatch.setitem(SOLVERS, "treg", (fn, config))
    calls.clear()
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "resumed", "--skip_existing") is None
    resumed, whole = pngs(tmp_path / "resumed"), pngs(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole)
    record = json.loads((tmp_path / "resumed/run.json").read_text())
    assert [image["index"] for image in record["images"]] == [0, 1, 2, 3]  # nothing duplicated


def test_batches_give_the_same_images(tmp_path):
    cfg = solver_yaml(tmp_path, "treg", steps=12)
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "b1") is None
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "b3", "--batch_size", 3) is None
    one, three = pngs(tmp_path / "b1"), pngs(tmp_path / "b3")
    assert one.keys() == three.keys()
    for k in one:  # batched float maths may round a pixel differently, nothing more
        assert np.abs(one[k].astype(int) - three[k].astype(int)).max() <= 1, k
    nfe = {b: {row["nfe"] for row in csv.DictReader(open(tmp_path / b / "metrics.csv"))} for b in ("b1", "b3")}
    assert nfe["b1"] == nfe["b3"] == {"24"}  # per image whatever the batch: 12 steps, 2 predictions each (w = 4)


def test_compare_mode_writes_grid_and_table(tmp_path, capsys):
    names = sorted(SOLVERS)
    for name in names:
        solver_yaml(tmp_path, name, steps=6)
    code = run_main("--solver_config", tmp_path / "solver-configs/treg.yaml", "--compare", ",".join(names),
                    "--workdir", tmp_path / "cmp", "--limit", 1, "--cfg_guidance", 3.0, "--null_lr", 1e-3)
    assert code is None
    sheet = Image.open(tmp_path / "cmp/compare/00000-a photo of a cat.png")
    assert sheet.width > (len(names) + 2) * 64 and sheet.height > 64
    table = (tmp_path / "cmp/compare.md").read_text()
    for name in names:
        assert f"| {name} |" in table
        assert (tmp_path / f"cmp/recon/{name}/00000-a photo of a cat.png").exists()
    out, err = capsys.readouterr()
    assert table in out
    settings = {line.split(":")[0]: line for line in err.splitlines() if line.split(":")[0] in names}
    assert set(settings) == set(names)  # each method's settings, and which of them a flag set
    assert "cfg_guidance 3.0 (--cfg_guidance)" in settings["ddim"] and "steps 6," in settings["ddim"]
    assert "null_lr 0.001 (--null_lr)" in settings["treg"] and "null_lr" not in settings["dps"]
    rows = list(csv.DictReader(open(tmp_path / "cmp/metrics.csv")))
    assert sorted(r["method"] for r in rows) == names
    record = json.loads((tmp_path / "cmp/run.json").read_text())
    assert record["solvers"]["treg"]["null_lr"] == 1e-3 and record["solvers"]["ddim"]["cfg_guidance"] == 3.0


def test_compare_takes_yaml_variants_of_one_solver(tmp_path):
    """--compare cci,cci-noiseless runs one solver twice under the YAMLs' names: two recon folders, two rows, and
    run.json records the solver and each variant's settings (σ_y: the task's for cci, 0 for cci-noiseless)."""
    code = run_main("--compare", "cci,cci-noiseless", "--workdir", tmp_path / "cmp", "--limit", 1)
    assert code is None
    record = json.loads((tmp_path / "cmp/run.json").read_text())
    assert {k: (v["solver"], v["sigma_y"]) for k, v in record["solvers"].items()} == {
        "cci": ("cci", 0.01), "cci-noiseless": ("cci", 0.0)}
    assert sorted(r["method"] for r in csv.DictReader(open(tmp_path / "cmp/metrics.csv"))) == ["cci", "cci-noiseless"]
    assert all((tmp_path / f"cmp/recon/{m}/00000-a photo of a cat.png").exists() for m in ("cci", "cci-noiseless"))


def test_two_process_accelerate_run_covers_every_image_once(tmp_path):
    cfg = solver_yaml(tmp_path, "treg", steps=12)
    assert run_main("--solver_config", cfg, "--workdir", tmp_path / "single") is None
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "solve.py",
           *map(str, BASE), "--solver_config", str(cfg), "--workdir", str(tmp_path / "multi")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "multi/run.json").read_text())
    assert sorted(image["index"] for image in record["images"]) == [0, 1, 2, 3]
    assert {image["process"] for image in record["images"]} == {0, 1}
    multi, single = pngs(tmp_path / "multi"), pngs(tmp_path / "single")
    assert multi.keys() == single.keys() and all(np.array_equal(multi[k], single[k]) for k in single)


def test_mean_interval_is_the_student_t_interval():
    """runs.mean_interval, which the benchmarks print as mean ± half-width, against scipy's t interval."""
    from scipy import stats
    from treg.runs import mean_interval
    values = [0.9, 1.3, 0.7, 1.1, 1.6]
    mean, half = mean_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and half == pytest.approx((high - low) / 2, rel=1e-12)
    assert mean_interval([2.0]) == (2.0, 0.0)


# --- one run per workdir ------------------------------------------------------------------------------------------

def tree(workdir):
    """{relative path: bytes} of every file under workdir."""
    return {p.relative_to(workdir): p.read_bytes() for p in sorted(Path(workdir).rglob("*")) if p.is_file()}


def counting_solver(monkeypatch):
    """Wrap treg's solver so that a test can count the images it solves."""
    fn, config = SOLVERS["treg"]
    solved = []

    def counted(prior, op, y, *args, **kwargs):
        solved.append(len(y))
        return fn(prior, op, y, *args, **kwargs)
    monkeypatch.setitem(SOLVERS, "treg", (counted, config))
    return solved


def test_other_settings_are_refused_and_overwrite_replaces_the_old_run(tmp_path):
    """Issue 16 §9: a new prompt and w = 0 into a used workdir, with --skip_existing, skipped every image and left
    the dog's PNGs under a run.json naming the coffee (then treg.commands.figure found two reconstructions)."""
    from treg.commands import figure
    work = tmp_path / "w"
    assert run_main("--workdir", work, "--steps", 3, "--limit", 2, "--prompt", "a photo of a dog") is None
    before = tree(work)
    coffee = ["--workdir", work, "--steps", 3, "--limit", 2, "--prompt", "a cup of coffee", "--cfg_guidance", 0]
    for extra in (["--skip_existing"], []):
        code = run_main(*coffee, *extra)
        assert isinstance(code, str) and code.startswith("error: --workdir") and "\n" not in code, code
        assert "prompt 'a photo of a dog' → 'a cup of coffee'" in code and "cfg_guidance 4.0 → 0.0" in code, code
        assert "--overwrite" in code
        assert tree(work) == before  # refused before anything was written or removed
    assert run_main(*coffee, "--overwrite") is None
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*.png")) == sorted(
        f"{kind}/0000{i}-a cup of coffee.png" for kind in ("input", "label", "recon", "ypred") for i in (0, 1))
    report = json.loads((work / "run.json").read_text())
    assert report["settings"]["prompt"] == "a cup of coffee" and report["solvers"]["treg"]["cfg_guidance"] == 0
    assert [r["settings"] == report["settings"] for r in report["images"]] == [True, True]
    info = figure.read_run(work)  # exactly one reconstruction of image 0
    assert info["prompt"] == "a cup of coffee" and info["w"] == 0


def test_skip_existing_skips_only_images_with_these_settings_and_file(tmp_path, monkeypatch):
    """Metrics, --limit and --batch_size may change between the runs of a workdir; an image file that changed is
    solved again, the others are not."""
    import hashlib
    import shutil
    folder = tmp_path / "images"
    folder.mkdir()
    for name, sample in (("a.jpg", "cat_1.jpg"), ("b.jpg", "coffee.jpg"), ("c.jpg", "rocket.jpg")):
        shutil.copy(ROOT / "samples" / sample, folder / name)
    work = tmp_path / "w"
    common = ["--img_path", folder, "--workdir", work, "--steps", 3]
    assert run_main(*common, "--limit", 2) is None
    solved = counting_solver(monkeypatch)
    assert run_main(*common, "--skip_existing", "--metrics", "psnr", "--batch_size", 2) is None
    assert solved == [1]  # only c.jpg, which --limit 2 left out
    shutil.copy(ROOT / "samples/astronaut.jpg", folder / "b.jpg")
    solved.clear()
    assert run_main(*common, "--skip_existing") is None
    assert solved == [1]  # b.jpg alone: its record was made from another file
    records = {r["index"]: r for r in json.loads((work / "run.json").read_text())["images"]}
    assert records[1]["image_sha256"] == hashlib.sha256((folder / "b.jpg").read_bytes()).hexdigest()
    assert sorted(records) == [0, 1, 2] and set(records[0]["results"]["treg"]["metrics"]) == {"psnr", "ssim"}


def test_outputs_of_an_unknown_run_are_refused_and_overwrite_keeps_foreign_files(tmp_path):
    work = tmp_path / "w"
    (work / "input").mkdir(parents=True)
    (work / "input" / "notes.txt").write_text("mine")
    (work / "run.json").write_text(json.dumps({"args": {"prompt": "a photo of a dog"}, "images": []}))
    args = ["--workdir", work, "--steps", 3, "--limit", 1]
    code = run_main(*args)
    assert "holds another run: run.json records no settings" in code and "\n" not in code, code
    (work / "run.json").unlink()
    (work / "recon").mkdir()
    Image.new("RGB", (64, 64)).save(work / "recon/00000-a photo of a dog.png")  # a PNG whose record was never written
    code = run_main(*args)
    assert "recon/00000-a photo of a dog.png is no output of these settings" in code, code
    assert "give one of them" in run_main(*args, "--overwrite", "--skip_existing")
    assert run_main(*args, "--overwrite") is None
    assert not (work / "recon/00000-a photo of a dog.png").exists()
    assert (work / "input/notes.txt").read_text() == "mine"  # not an output of solve.py: kept
    assert (work / "recon/00000-a photo of a cat.png").exists()
    # the same settings again, beside the PNG that a killed run of them wrote for image 3 before its record: accepted
    Image.new("RGB", (64, 64)).save(work / "recon/00003-a photo of a cat.png")
    assert run_main(*args, "--metrics", "psnr") is None
