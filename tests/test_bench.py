"""The benchmark entry point: what it times, what it writes, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jem.bench.cli import main

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def _cells(markdown: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``markdown``, padding stripped."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_side_by_side_training_rows_and_report(tmp_path):
    report, out = tmp_path / "performance.md", tmp_path / "bench.json"
    rc = main(["--params", PARAMS, "--variant", "softmax", "--device", "cpu", "--batch", "4", "--steps", "1",
               "--warmup", "0", "--compare", "--compile", "off", "--perf", "grouped_passes=true",
               "--report", str(report), "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["reference", "baseline", "fast"]
    for r in rows:
        assert r["batch"] == 4 and r["ms_per_iter"] > 0 and r["params_m"] == rows[0]["params_m"]
        assert abs(r["images_per_s"] - 4 / (r["ms_per_iter"] / 1e3)) < 1e-6 * r["images_per_s"]
    assert rows[0]["compiled"] == "eager (the reference loop)"
    assert rows[1]["perf"]["channels_last"] is False and rows[2]["perf"]["channels_last"] is True
    assert [r["perf"]["grouped_passes"] for r in rows] == [False, False, True]  # --perf sets the fast mode's
    text = report.read_text()
    cells = _cells(text)
    assert "## Training" in text and "## FID" not in text
    assert ["variant", "mode", "model", "batch / p(x)", "sampler", "SAM", "ms/iter", "IQR %", "img/s", "min/epoch*",
            "TFLOP/s", "peak MB"] in cells
    assert [c[:2] for c in cells if c[0] == "softmax" and len(c) == 12] == [
        ["softmax", "reference"], ["softmax", "baseline"], ["softmax", "fast"]]
    ms = {r["mode"]: r["ms_per_iter"] for r in rows}
    ratios = (ms["reference"] / ms["fast"], ms["baseline"] / ms["fast"], ms["baseline"] / ms["reference"])
    assert ["softmax", f"**{ratios[0]:.2f}x**", f"{ratios[1]:.2f}x", f"{ratios[2]:.3f}"] in cells


def _tiny(name: str):
    """``name`` at the demo scale on a WRN-10-1 with batches of 4."""
    import yaml

    from jem.config.params import resolve_variant
    from jem.config.variant import Variant

    d = resolve_variant(yaml.safe_load(Path(PARAMS).read_text()), name, "demo").to_dict()
    d["model"].update(depth=10, width=1)
    d["train"].update(batch_size=4, px_batch_size=4)
    return Variant.from_dict(d)


@pytest.mark.parametrize("variant", ["jem_k20", "jempp_m10", "sadajem_k5"])
def test_the_reference_row_runs_the_published_loop_of_each_family(variant, monkeypatch):
    """The reference row trains the copy the reference loop holds: over the warm-up and timed
    iterations its weights, running statistics and replay-buffer rows all move."""
    import jem.bench.speed
    from jem.method.reference import ReferenceLoop

    seen: dict[str, object] = {}
    real_init = ReferenceLoop.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["loop"] = self
        seen["start"] = {k: t.clone() for k, t in self.f.state_dict().items()}
        seen["buffer"] = self.buffer.clone()

    monkeypatch.setattr(ReferenceLoop, "__init__", spy)
    row = jem.bench.speed.benchmark(_tiny(variant), jem.bench.speed.torch.device("cpu"), steps=2, warmup=1,
                                    perf=jem.bench.speed.baseline_perf(), n_images=64, label="reference",
                                    reference=True)
    loop = seen["loop"]
    assert row["mode"] == "reference" and row["ms_per_iter"] > 0 and loop.cur_iter == 3
    moved = [k for k, t in loop.f.state_dict().items() if not jem.bench.speed.torch.equal(t, seen["start"][k])]
    assert "head.weight" in moved and "stem.weight" in moved
    assert all(k in moved for k in seen["start"] if k.endswith("running_mean"))  # where the family has BN
    assert not jem.bench.speed.torch.equal(loop.buffer, seen["buffer"])  # the chains were written back


@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:invalid value encountered")  # 6 samples, 2048 dims
def test_fid_timing_of_the_fid_stages_work(tmp_path):
    report, out = tmp_path / "performance.md", tmp_path / "bench.json"
    rc = main(["--params", PARAMS, "--device", "cpu", "--skip-train", "--fid", "6", "--fid-batch", "4",
               "--report", str(report), "--json", str(out)])
    assert rc == 0
    fid = json.loads(out.read_text())["fid"]
    assert fid["images"] == 6 and fid["weights"].startswith("random")
    assert fid["total_s"] >= fid["features_s"] > 0
    # the per-sample part scales to 50,000; the square root does not
    per_sample = (fid["features_s"] + fid["stats_is_s"]) / 6
    assert abs(fid["projected_50k_s"] - (50_000 * per_sample + fid["frechet_s"])) < 1e-6 * fid["projected_50k_s"]
    text = report.read_text()
    assert "## FID and IS" in text and "## Training" not in text and [c[0] for c in _cells(text)][2:] == ["6"]


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["--params", PARAMS, "--skip-train"]) == 2
    assert "add --fid N" in capsys.readouterr().err
    assert main(["--params", PARAMS, "--skip-train", "--fid", "1"]) == 2
    assert "at least 2 samples" in capsys.readouterr().err
    for bad, why in (("grouped=true", "--perf.grouped: unknown key (did you mean 'grouped_passes'?)"),
                     ("grouped_passes=2", "--perf.grouped_passes = 2: expected true or false"),
                     ("precision=fp16", "--perf.precision = 'fp16'"),
                     ("grouped_passes", "--perf 'grouped_passes': expected KEY=VALUE")):
        assert main(["--params", PARAMS, "--device", "cpu", "--perf", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read --params" in capsys.readouterr().err
    assert main(["--params", PARAMS, "--variant", "no_such_variant", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    missing = tmp_path / "weights.pth"
    assert main(["--params", PARAMS, "--device", "cpu", "--skip-train", "--fid", "4",
                 "--inception-weights", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_stage_times_multiply_the_units_out_to_the_paper_counts():
    """Every stage's projection is its unit times the paper's counts (hand-counted here)."""
    import yaml

    from jem.bench.stage_times import split_sizes, stage_times, total_seconds
    from jem.config.params import resolve_variant
    from jem.config.settings import stage_section

    params = yaml.safe_load(Path(PARAMS).read_text())
    variant = resolve_variant(params, "sadajem_k5", "paper")
    sections = {s: stage_section(params, s, "paper") for s in ("sample", "evaluate", "fid", "robustness")}
    sizes = {role: split_sizes(spec["paper"]) for role, spec in params["datasets"].items()}
    assert sizes["cifar10"] == {"train": 45_000, "val": 5_000, "test": 10_000, "interp": 10_000}
    assert sizes["svhn"]["test"] == 26_032 and sizes["celeba"]["test"] == 19_962
    units = {"train_iter": 0.1, "chain_batch": 0.5, "forward_image": 1e-4, "ood_image": 3e-4, "pgd_fixed": 0.2,
             "pgd_step": 0.03, "inception_image": 2e-4, "frechet": 1.5, "bpda_fixed": 0.7, "bpda_step": 0.9}
    got = {t.stage: t.seconds for t in stage_times(variant, sections, sizes, units)}
    assert got["train (one epoch)"] == pytest.approx(351 * 0.1)  # 45,000 // 128
    assert got["train"] == pytest.approx(200 * 351 * 0.1)
    # 10,000 fresh chains in 157 batches of 64, 10 x 10 class-conditional in 2; 20,100 images classified
    assert got["sample"] == pytest.approx(159 * 0.5 + 20_100 * 1e-4)
    # test twice, BN re-estimate over 45,000, landscape 21 x 4,500; OOD: test + SVHN + Interp + CIFAR-100 + CelebA
    assert got["evaluate"] == pytest.approx((20_000 + 45_000 + 94_500) * 1e-4
                                            + (10_000 + 26_032 + 10_000 + 10_000 + 19_962) * 3e-4)
    assert got["fid"] == pytest.approx(20_000 * 2e-4 + 2 * 2 * 1.5)  # two sets x two protocols
    # PGD: 4 batches x 13 radii x 50 steps; BPDA+EOT: 4 batches x 4 radii x 40 steps
    assert got["robustness"] == pytest.approx(4 * 13 * (0.2 + 50 * 0.03) + 4 * 4 * (0.7 + 40 * 0.9))
    assert total_seconds(stage_times(variant, sections, sizes, units)) == pytest.approx(
        sum(v for k, v in got.items() if k != "train (one epoch)"))


def test_stage_times_measured_on_this_machine(tmp_path):
    """``--stages`` measures each unit with the stages' own calls and totals a published table."""
    from jem.bench.markdown import markdown_report

    published = tmp_path / "published.yaml"
    published.write_text("t1:\n  title: Table X\n  rows:\n    - {variant: sadajem_k5}\n    - {variant: softmax}\n")
    import yaml

    params = yaml.safe_load(Path(PARAMS).read_text())  # the demo scale, timed on small batches
    params["evaluate"]["batch_size"], params["robustness"]["batch_size"] = 32, 16
    params["scales"]["demo"]["robustness"]["bpda"]["images"] = 4
    small = tmp_path / "params.yaml"
    small.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "bench.json"
    rc = main(["--params", str(small), "--variant", "sadajem_k5", "--device", "cpu", "--batch", "8", "--steps", "1",
               "--warmup", "0", "--skip-train", "--fid", "4", "--fid-batch", "4", "--stages", "--table", "t1",
               "--published", str(published), "--json", str(out)])
    assert rc == 0
    st = json.loads(out.read_text())["stages"]
    assert [t["stage"] for t in st["stages"]] == ["train (one epoch)", "train", "sample", "evaluate", "fid",
                                                  "robustness"]
    assert all(t["seconds"] > 0 for t in st["stages"]) and all(v > 0 for v in st["units"].values())
    assert "BPDA+EOT" in st["stages"][-1]["work"]
    (table,) = st["tables"]
    rows = {r["variant"]: r for r in table["rows"]}
    assert set(rows) == {"sadajem_k5", "softmax"} and rows["sadajem_k5"]["total_s"] == pytest.approx(st["total_s"])
    assert [t["stage"] for t in table["fid_ref"]] == ["fid_ref@cifar10"]
    ref = table["fid_ref"][0]["seconds"]
    assert table["total_s"] == pytest.approx(sum(r["total_s"] for r in rows.values()) + ref)
    assert table["wall_s"]["1"] == pytest.approx(table["total_s"])  # one device: one after another
    k5, soft = rows["sadajem_k5"], rows["softmax"]  # two devices: each phase takes its longer variant
    assert table["wall_s"]["2"] == pytest.approx(max(k5["train_s"], soft["train_s"]) + ref
                                                 + max(k5["other_s"], soft["other_s"]))
    text = markdown_report([], "jem-bench --stages", None, st)
    cells = _cells(text)
    assert "## Stage times at the demo scale: sadajem_k5" in text
    assert any(c[0] == "robustness" and c[1].startswith("PGD: ") for c in cells)
    assert ["Table X (`t1`)", "2"] in [c[:2] for c in cells] and "softmax" in [c[0] for c in cells]
    assert "Stages that take longer than training:" in text


def test_a_table_on_n_devices_follows_the_table_commands_schedule():
    """Tasks go out in table order to the first free device; the phases follow one another."""
    from jem.bench.stage_times import list_schedule, table_wall_time

    assert list_schedule([5, 1, 1, 1], 2) == 5  # the long one on one device, the rest on the other
    assert list_schedule([1, 1, 1, 5], 2) == 6  # handed out last, the long one waits for a free device
    assert list_schedule([3, 3, 3], 1) == 9 and list_schedule([3, 3, 3], 8) == 3 and list_schedule([], 4) == 0
    # trainings, the reference statistics once, then the evaluations
    assert table_wall_time([4, 2], [1, 3], [0.5], 2) == 4 + 0.5 + 3
    assert table_wall_time([4, 2], [1, 3], [0.5], 1) == 6 + 0.5 + 4


def test_iterations_are_timed_one_by_one_and_summarised_by_the_median(monkeypatch):
    """One disturbed iteration (a shared machine) moves the mean, not the reported median."""
    import jem.bench.speed

    clock = [0.0]
    durations = iter([0.10, 0.11, 0.09, 0.10, 1.50])  # seconds; the last one disturbed
    monkeypatch.setattr(jem.bench.speed.time, "perf_counter", lambda: clock[0])

    def step() -> None:
        clock[0] += next(durations)

    times = jem.bench.speed.iteration_times(step, 5, jem.bench.speed.torch.device("cpu"))
    assert times == pytest.approx([0.10, 0.11, 0.09, 0.10, 1.50])
    monkeypatch.setattr(jem.bench.speed, "iteration_times", lambda step, steps, device: times)
    row = jem.bench.speed.benchmark(_tiny("softmax"), jem.bench.speed.torch.device("cpu"), steps=5, warmup=0,
                                    n_images=64)
    assert row["ms_per_iter"] == pytest.approx(100.0) and row["ms_per_iter_mean"] == pytest.approx(380.0)
    assert row["ms_quartiles"] == pytest.approx([95.0, 805.0])  # statistics.quantiles' default method
    assert row["spread_pct"] == pytest.approx(710.0)
    assert row["images_per_s"] == pytest.approx(4 / 0.1)


def test_iteration_flops_count_forward_and_backward_exactly():
    """FlopCounterMode's count, by hand: a product of an (n x i) and an (i x o) matrix is 2nio FLOPs,
    forward, for the weights' gradient and for the input's; a sampler step's gradient (w.r.t. a
    leaf input only, the case the module tracker breaks) costs one more forward."""
    import torch
    from torch import nn

    from jem.bench.speed import iteration_flops

    n, i, o = 5, 6, 4
    linear, x = nn.Linear(i, o), torch.randn(n, i)
    assert iteration_flops(lambda: linear(x)) == 2 * n * i * o
    assert iteration_flops(lambda: linear(x).sum().backward()) == 2 * (2 * n * i * o)  # no input gradient
    assert iteration_flops(lambda: linear(x.requires_grad_()).sum().backward()) == 3 * (2 * n * i * o)
    conv, image = nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 5, 5)
    forward = 2 * (2 * 8 * 5 * 5) * (3 * 3 * 3)  # 2 x outputs x (in-channels x kernel) MACs each
    assert iteration_flops(lambda: conv(image)) == forward
    conv.requires_grad_(False)
    leaf = image.clone().requires_grad_()
    assert iteration_flops(lambda: torch.autograd.grad(conv(leaf).sum(), [leaf])) == 2 * forward


def test_the_flop_rate_counts_every_sampler_step_and_sams_second_pass():
    """The TFLOP/s column divides a counted iteration: each further SGLD step adds one forward and
    one input-gradient backward of the p(x) batch, and SAM repeats the loss passes."""
    import torch

    from jem.bench.speed import benchmark, iteration_flops
    from jem.config.variant import Variant
    from jem.method.models import WideResNet

    def counted(name: str, **changes: dict[str, object]) -> int:
        d = _tiny(name).to_dict()
        for block, values in changes.items():
            d[block].update(values)
        row = benchmark(Variant.from_dict(d), torch.device("cpu"), steps=1, warmup=1, n_images=64)
        assert row["tflops"] == pytest.approx(row["flops_per_iter"] / (row["ms_per_iter"] / 1e3) / 1e12)
        return row["flops_per_iter"]

    variant = _tiny("jem_k20")
    model = WideResNet(variant.model)
    size = variant.model.image_size
    with torch.no_grad():
        image = iteration_flops(lambda: model(torch.zeros(1, 3, size, size)))
    k1, k2, k5 = (counted("jem_k20", sampler={"steps": k}) for k in (1, 2, 5))
    sampler_step = variant.train.px_batch_size * 2 * image
    assert k2 - k1 == sampler_step and k5 - k2 == 3 * sampler_step
    loss_passes = k1 - sampler_step  # labelled, x+ and x-: forward and both gradients
    assert counted("jem_k20", sampler={"steps": 1}, optim={"sam": "sam"}) == k1 + loss_passes
