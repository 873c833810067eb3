"""params.yaml: every variant resolves, and the method families carry the papers' settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jem.config.errors import ConfigError
from jem.config.params import resolve_variant, selected_variants, variant_dataset
from jem.config.settings import stage_section

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("scale", ["demo", "paper", "tiny"])
def test_every_method_resolves_at_every_scale(scale):
    for name in PARAMS["methods"]:
        variant = resolve_variant(PARAMS, name, scale)
        assert variant.name == name and variant.family in PARAMS["families"]
    assert selected_variants(PARAMS)


def test_paper_scale_matches_the_papers():
    sada = resolve_variant(PARAMS, "sadajem_k5", "paper")
    assert (sada.model.depth, sada.model.width, sada.model.norm) == (28, 10, "batch")
    s = sada.sampler
    assert (s.kind, s.steps, s.step_size, s.noise, s.grad_clamp, s.image_clamp) == ("sgld", 5, 1.0, 0.0, 1.0, True)
    assert (sada.buffer.size, sada.buffer.reinit_freq, sada.buffer.init) == (10000, 0.05, "gmm")
    assert (sada.optim.sam, sada.optim.rho, sada.optim.lr, sada.optim.milestones) == ("sam", 0.2, 0.1, [60, 120, 180])
    assert (sada.optim.gamma, sada.optim.warmup_iters, sada.train.epochs) == (0.2, 1000, 200)
    assert not sada.objective.px_augment and (sada.train.batch_size, sada.train.px_batch_size) == (128, 64)
    assert resolve_variant(PARAMS, "c100_sadajem_k5", "paper").optim.lr == 0.01
    assert resolve_variant(PARAMS, "c100_sadajem_k5", "paper").model.num_classes == 100

    jem = resolve_variant(PARAMS, "jem_k20", "paper")
    assert (jem.model.norm, jem.buffer.init, jem.optim.name, jem.optim.lr) == ("none", "uniform", "adam", 1e-4)
    s = jem.sampler
    assert (s.steps, s.noise, s.grad_clamp, s.bn_mode) == (20, 0.01, None, "eval")
    assert jem.objective.px_augment and jem.objective.input_noise == 0.03

    jempp = resolve_variant(PARAMS, "jempp_m10", "paper")
    p = jempp.sampler
    assert (p.kind, p.steps, p.inner_steps, p.inner_step_size, p.grad_clamp) == ("pyld", 10, 5, 0.2, 1.0)
    assert (jempp.optim.milestones, jempp.train.epochs, jempp.model.bn_momentum) == ([50, 100, 125], 150, 0.9)
    assert resolve_variant(PARAMS, "sadajem_k10_asam_rho2", "paper").optim.sam == "asam"
    assert resolve_variant(PARAMS, "sadajem_k10_l2", "paper").objective.energy_l2 > 0


def test_demo_shrinks_the_model_but_keeps_the_method():
    for name in PARAMS["methods"]:
        demo, paper = (resolve_variant(PARAMS, name, s) for s in ("demo", "paper"))
        assert (demo.model.depth, demo.model.width) == (10, 1)
        assert demo.sampler == paper.sampler and demo.objective == paper.objective
        # the schedule's length and the batch change with the scale; the method's optimizer does not
        same = ("name", "lr", "momentum", "nesterov", "weight_decay", "betas", "sam", "rho", "schedule", "gamma")
        assert all(getattr(demo.optim, k) == getattr(paper.optim, k) for k in same), name
        assert paper.optim.lr_scale == 1.0 and paper.optim.warmup_iters == 1000
        # the demo's short run ends decayed, as the papers' runs do (eval-mode BN statistics
        # come from the last labelled batch: at peak lr they lag the final update)
        assert all(m < demo.train.epochs for m in demo.optim.milestones), name


def test_published_rows_name_defined_variants():
    published = yaml.safe_load((ROOT / "reports" / "published.yaml").read_text())
    named = {row["variant"] for table in published.values() for row in table["rows"]}
    assert named <= set(PARAMS["methods"])


def test_each_named_table_trains_the_variants_its_published_table_compares():
    """`tables` in params.yaml (what `python -m stages.table <name>` trains) and the rows of the published
    table of the same name (what the report compares them with) name the same variants, in order."""
    published = yaml.safe_load((ROOT / "reports" / "published.yaml").read_text())
    tables = PARAMS["tables"]
    assert {"sadajem_table1", "sadajem_table2", "sadajem_table5", "sadajem_table6", "jempp_table2", "jempp_table3",
            "jempp_table4", "jempp_table5"} <= set(tables)
    for name, variants in tables.items():
        if name in published:
            assert variants == list(dict.fromkeys(row["variant"] for row in published[name]["rows"])), name
    assert tables["demo"] == PARAMS["variants"]


def test_clear_errors_for_unknown_names():
    with pytest.raises(ConfigError, match=r"variant: 'sadajem_k50' is not defined \(did you mean 'sadajem_k5'\?\)"):
        resolve_variant(PARAMS, "sadajem_k50", "paper")
    with pytest.raises(ConfigError, match=r"scale: 'papr' is not defined \(did you mean 'paper'\?\)"):
        resolve_variant(PARAMS, "sadajem_k5", "papr")
    broken = {**PARAMS, "methods": {"x": {"family": "sadajm"}}}
    with pytest.raises(ConfigError, match=r"methods.x.family: 'sadajm' is not defined \(did you mean 'sadajem'\?\)"):
        resolve_variant(broken, "x", "paper")
    assert variant_dataset(PARAMS, "c100_jem_k20") == "cifar100"
    assert stage_section(PARAMS, "sample", "demo")["buffer"] < stage_section(PARAMS, "sample", "paper")["buffer"]
