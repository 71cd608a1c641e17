"""The speed benchmark end to end on a tiny setting: it runs solve.py per configuration and reports real numbers."""
import json

from treg.bench import speed as bench_speed


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


def test_compose_counts_a_dps_schedule_and_adds_its_parts(tmp_path):
    """The tiny model's call counts for DPS at w = 0 (one noise prediction, one UNet and one decoder backward per
    step, plus the final decode), and the composed time written out from them by hand."""
    counted = bench_speed.profile_tiny("dps", 2, 32, tmp_path)
    assert counted["calls"]["unet"] == counted["nfe"] == 2 and counted["calls"]["unet_backward"] == 2
    assert counted["calls"]["vae_decode"] == 3 and counted["calls"]["vae_decode_backward"] == 2
    parts = {"unet_b1": 1.0, "unet_b2_cfg": 1.9, "unet_fwd_bwd_b1": 3.0, "vae_decode": 10.0,
             "vae_decode_fwd_bwd": 30.0}
    total, outside = bench_speed.compose(parts, {**counted, "seconds_outside_per_step": 0.5}, 2)
    assert outside == 1.0 and abs(total - (2 * 1.0 + 2 * 2.0 + 3 * 10.0 + 2 * 20.0 + 1.0)) < 1e-9
    # DDIM at its YAML w = 4: one CFG call of two latents per step, no backward
    ddim = bench_speed.profile_tiny("ddim", 2, 32, tmp_path)
    total, _ = bench_speed.compose(parts, {**ddim, "seconds_outside_per_step": 0.0}, 2)
    assert ddim["nfe"] == 4 and abs(total - (2 * 1.9 + 10.0)) < 1e-9
    assert bench_speed.compose({"unet_b1": 1.0}, {**counted, "seconds_outside_per_step": 0.0}, 2) is None


def test_components_and_compose_reports_on_the_tiny_model(tmp_path):
    from treg.priors.tiny import build_tiny_sd
    model = build_tiny_sd(tmp_path / "tiny")
    parts = tmp_path / "parts"
    bench_speed.main(["--components", "--model", str(model), "--image_size", "64", "--out", str(parts),
                      "--parts", "unet_b1,unet_b2_cfg,vae_decode,vae_decode_fwd_bwd", "--checkpointing"])
    report = json.loads(parts.with_suffix(".json").read_text())
    assert set(report["parts"]) == {"unet_b1", "unet_b2_cfg", "vae_decode", "vae_decode_fwd_bwd",
                                    "vae_decode_fwd_bwd + checkpointing"}
    # Each peak is a real RSS (the reset sets VmHWM to the current RSS, not to 0). It is not compared with the RSS
    # before the first call: in a long test process the kernel may drop file-backed pages (shared libraries, mmapped
    # weights) between the two readings, and a fresh-clone CI run once saw a peak below 0.9 of it.
    assert report["settings"]["weights_rss_mb"] > 100
    assert all(v["seconds"] > 0 and v["peak_rss_mb"] > 100 for v in report["parts"].values())
    out = tmp_path / "composed"
    bench_speed.main(["--compose", str(parts.with_suffix(".json")), "--solvers", "ddim,dps,ddrm",
                      "--count_size", "32", "--out", str(out)])
    composed = json.loads(out.with_suffix(".json").read_text())
    assert composed["composed"]["ddim"]["s_per_image"] > 0 and composed["composed"]["ddim"]["nfe"] == 400
    assert "not measured" in composed["composed"]["dps"]["note"]  # its UNet backward was not among --parts
    assert "linear map" in composed["refused"]["ddrm"]
    assert composed["model_free_s"]["cg_prox_s"] > 0
