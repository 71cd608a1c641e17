"""The GPU check's CPU path (its smoke form) on the tiny model, and its NaN detection."""
import json
import platform

import torch

from treg.bench import gpu as bench_gpu


def test_gpu_check_smoke_form_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    bench_gpu.main(["--device", "cpu", "--model", "tiny", "--image_size", "64", "--steps", "1", "--dtypes", "fp32",
                    "--solvers", "ddim,treg,dps,ddrm", "--compile_dtypes", "fp32", "--compile_backend", "eager",
                    "--reps", "1", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    for solver in ("ddim", "treg", "dps"):
        run = report["solvers"][f"{solver}, fp32"]
        assert run["status"] == "ok" and run["steps_finite"] and run["output_finite"] and run["s_per_step"] > 0
    assert report["solvers"]["ddrm, fp32"]["status"].startswith("refused") and "linear map" in \
        report["solvers"]["ddrm, fp32"]["status"]
    assert report["precision"]["fp32"]["cg_prox_dtype"] == "torch.float32"
    assert report["precision"]["fp32"]["decode_max_abs_err_vs_fp32"] == 0  # the same decoder in the same dtype
    steps = report["unet_step"]
    assert set(steps) == {"fp32, eager", "fp32, torch.compile (eager)"}
    assert all(v["s_per_step"] > 0 and "error" not in v for v in steps.values())
    text = out.with_suffix(".md").read_text()
    assert platform.node() in text and "| dps, fp32 | ok |" in text


def test_run_solver_reports_nan_and_errors_instead_of_raising(tiny_prior):
    from treg.operators import build_operator

    class NaNPrior:  # the tiny prior with a noise prediction that overflowed
        def __getattr__(self, name):
            return getattr(tiny_prior, name)

        def eps(self, z, t, e):
            return torch.full_like(tiny_prior.eps(z, t, e), float("nan"))

    op = build_operator("super_resolution", 64, scale=16)
    y = op.A(torch.zeros(1, 3, 64, 64))
    uc, c = tiny_prior.embed(["", "a cat"]).chunk(2)
    bad = bench_gpu.run_solver(NaNPrior(), op, y, "ddim", 1, c, uc, torch.device("cpu"))
    assert bad["status"] == "ok" and not bad["steps_finite"] and not bad["output_finite"]
    good = bench_gpu.run_solver(tiny_prior, op, y, "ddim", 1, c, uc, torch.device("cpu"))
    assert good["steps_finite"] and good["output_finite"]

    class HalfPrior(NaNPrior):  # a model that refuses the dtype it is given, as a mixed-precision bug does
        def eps(self, z, t, e):
            raise RuntimeError("expected scalar type Half but found Float\n(long trace)")

    broken = bench_gpu.run_solver(HalfPrior(), op, y, "dps", 1, c, uc, torch.device("cpu"))
    assert broken["status"] == "error: RuntimeError: expected scalar type Half but found Float"
