"""The speed benchmark end to end on a tiny setting: it runs solve.py per configuration and reports real numbers."""
import json

from treg import bench_speed


def test_bench_speed_reports_breakdown_nfe_and_memory(tmp_path, capsys):
    out = tmp_path / "speed"
    bench_speed.main(["--steps", "3", "--image_size", "64", "--solvers", "ddim,dps", "--device", "cpu",
                      "--fast", "cci,ddrm", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    ddim, dps = report["solvers"]["ddim"], report["solvers"]["dps"]
    assert ddim["nfe"] == dps["nfe"] == 6  # 3 steps at w = 5: two noise predictions each
    assert ddim["unet_bwd_s"] == 0 < dps["unet_bwd_s"] and dps["decode_bwd_s"] > 0  # only DPS backpropagates
    for row in (ddim, dps):
        parts = sum(v for k, v in row.items() if k.endswith("_s") and k != "wall_s")
        assert 0 < parts <= row["wall_s"] * 1.01 and row["peak_memory_mb"] > 0
    assert set(report["checkpointing"]) == {"dps", "dps + gradient checkpointing"}
    assert set(report["batching"]) == {"treg, batch 1", "treg, batch 4"}
    assert report["blur"]["fft_s"] > 0 and report["blur"]["conv2d_s"] > 0
    cci = report["fast"]["cci, 5 steps"]  # its YAML's 5 steps, not --steps; one VJP through the UNet per step
    assert cci["nfe"] == 10 and cci["unet_bwd_s"] > 0 and set(report["fast"]) == {"cci, 5 steps"}
    assert "linear map" in report["refused"]["ddrm"]  # Stable Diffusion's decoder is nonlinear
    printed = capsys.readouterr().out
    assert printed == out.with_suffix(".md").read_text() + "\n" and "| dps |" in printed
