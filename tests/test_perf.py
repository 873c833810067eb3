"""The fast paths compute what the safe default computes, within numerical tolerance (CPU)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jem.config.variant import PerfConfig, SamplerConfig
from jem.method.gmm import compute_mixture_stats
from jem.method.objectives import jem_loss
from jem.method.samplers import sample
from jem.method.train import Trainer, autocast

from .conftest import tiny_variant

SADAJEM = {"sampler": {"grad_clamp": 1.0, "image_clamp": True, "noise": 0.0, "bn_mode": "train"},
           "buffer": {"init": "gmm"}, "optim": {"sam": "sam", "rho": 0.2}, "objective": {"px_augment": False}}
JEMPP = {"sampler": {"kind": "pyld", "steps": 2, "inner_steps": 2, "step_size": 0.0, "grad_clamp": 1.0,
                     "image_clamp": True, "bn_mode": "train"}, "buffer": {"init": "gmm"}}
JEM = {"model": {"norm": "none"}, "optim": {"name": "adam", "lr": 1e-3}}


def _run(family: dict, perf: PerfConfig, data: tuple[torch.Tensor, torch.Tensor], steps: int = 3) -> Trainer:
    images, labels = data
    trainer = Trainer(tiny_variant(**family), images, labels, mixture=compute_mixture_stats([(images, labels)], 4),
                      perf=perf)
    trainer.fit(until=steps, progress=False)
    return trainer


def _assert_close(a: Trainer, b: Trainer, rtol: float, atol: float) -> None:
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        if p.is_floating_point():
            torch.testing.assert_close(p.contiguous(), q.contiguous(), rtol=rtol, atol=atol, msg=name)
    if a.buffer is not None:
        torch.testing.assert_close(a.buffer.samples.cpu(), b.buffer.samples.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", [SADAJEM, JEMPP, JEM], ids=["sadajem", "jempp", "jem"])
def test_channels_last_fused_optimizer_and_cpu_buffer_agree_with_the_default(family, tiny_data):
    base = _run(family, PerfConfig(), tiny_data)
    fast = _run(family, PerfConfig(channels_last=True, fused_optimizer=True), tiny_data)
    _assert_close(base, fast, rtol=1e-4, atol=1e-5)
    moved = _run(family, PerfConfig(buffer_device="cpu", data_device="cpu"), tiny_data)
    _assert_close(base, moved, rtol=0, atol=0)  # the same device here: the same numbers


def _loss_and_grads(model, batches, precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), precision):
        loss, _ = jem_loss(model, *batches, tiny_variant().objective)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_bf16_autocast_stays_close_to_fp32(tiny_data):
    trainer = Trainer(tiny_variant(), *tiny_data)
    model = trainer.model.train()
    x_lab, y = trainer.clf_stream.batch(0)
    x_pos, _ = trainer.px_stream.batch(0)
    x_neg = torch.rand_like(x_pos) * 2 - 1
    state = copy.deepcopy(model.state_dict())
    loss32, grads32 = _loss_and_grads(model, (x_lab, y, x_pos, x_neg), "fp32")
    model.load_state_dict(state)  # the same batch-norm statistics for the second pass
    loss16, grads16 = _loss_and_grads(model, (x_lab, y, x_pos, x_neg), "bf16")
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) < 0.02 * abs(loss32)
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads16])
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.99

    model.eval()
    cfg = SamplerConfig(kind="sgld", steps=3, step_size=1.0, noise=0.0)
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    with autocast(torch.device("cpu"), "bf16"):
        x16 = sample(model, x0, cfg)
    x32 = sample(model, x0, cfg)
    assert x16.dtype == torch.float32  # the chains themselves stay in float32
    moved = (x32 - x0).abs().mean()
    assert (x16 - x32).abs().mean() < 0.05 * moved


@pytest.mark.e2e(cost=35)
def test_compiled_trunk_matches_eager(tiny_data):
    """Inductor's generated code (a real compile on this CPU) computes eager's numbers through SADA-JEM's
    training steps: the sampler's forwards and input gradients, the train-mode passes, the backward. Without
    SAM, whose second pass only adds graphs of the same layers with frozen statistics (48 s alone instead of
    34 s); those graphs are captured and checked against eager by the aot_eager test below (sadajem-sam)."""
    from torch._dynamo.utils import counters

    family = {**SADAJEM, "optim": {"sam": "none"}}
    base = _run(family, PerfConfig(), tiny_data, steps=2)
    graphs = counters["stats"]["unique_graphs"]
    fast = _run(family, PerfConfig(compile=True), tiny_data, steps=2)
    if fast.compiled.startswith("compiled"):  # this machine can compile: it did, without falling back
        assert counters["stats"]["unique_graphs"] > graphs and counters["frames"]["ok"] == counters["frames"]["total"]
    else:
        assert fast.compiled.startswith("eager:")
    _assert_close(base, fast, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("family", "grouped"),
                         [(SADAJEM, False), (JEMPP, False),
                          ({**SADAJEM, "sampler": {**SADAJEM["sampler"], "bn_mode": "eval"}}, False), (SADAJEM, True)],
                         ids=["sadajem-sam", "jempp-pyld", "bn-eval-sampler", "sadajem-grouped-passes"])
def test_compiled_trunk_survives_training_steps_with_bounded_graphs(family, grouped, tiny_data, monkeypatch):
    """dynamo and AOTAutograd (the aot_eager backend: the same graph capture and
    functionalisation as inductor, without code generation, so seconds on a CPU) through real
    training steps: several train-mode forwards, each updating running statistics, before one
    backward; SAM's frozen-statistics pass; the sampler in train or eval mode. Every frame
    compiles (nothing falls back to eager), the graphs stop growing after the first steps and
    stay under dynamo's recompile limit, and the numbers are eager's. With grouped passes too
    (the deferred x+ update reads the batch count on the device: no graph break)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    import jem.method.train

    monkeypatch.setattr(jem.method.train, "COMPILE_BACKEND", "aot_eager")
    dynamo.reset()
    counters.clear()
    base = _run(family, PerfConfig(grouped_passes=grouped), tiny_data, steps=6)
    fast = _run(family, PerfConfig(compile=True, grouped_passes=grouped), tiny_data, steps=3)
    if not fast.compiled.startswith("compiled"):
        pytest.skip(fast.compiled)
    graphs = counters["stats"]["unique_graphs"]
    fast.fit(until=6, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs, "steady-state steps recompiled"
    limit = getattr(dynamo.config, "recompile_limit", None) or dynamo.config.cache_size_limit
    assert 0 < graphs < limit
    assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])
    _assert_close(base, fast, rtol=1e-4, atol=1e-5)
    dynamo.reset()


def _three_forwards_one_backward(model: torch.nn.Module, x_big: torch.Tensor, x_small: torch.Tensor,
                                 weight: torch.Tensor) -> list[torch.Tensor]:
    """A warm-up forward (its graph gets compiled), then what a training step does: several
    train-mode forwards of different batch sizes before one backward."""
    model.zero_grad(set_to_none=True)
    model(x_big)
    loss = (model(x_small) * weight[: len(x_small)]).sum() + (model(x_big) * weight).sum()
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters()), *model.buffers()]


def test_compiled_trunk_mixes_with_eager_fallback_before_one_backward(monkeypatch):
    """The CUDA crash of compiled training, reproduced on a CPU: once dynamo falls back to
    eager for one batch size (recompile limit reached, here forced to 1), an eager forward
    saves the batch-norm running statistics for its backward, and a compiled forward of
    another batch size before that backward updates them in place: "modified by an inplace
    operation". The trunk compiled with its statistics as values (``jem.method.models.Trunk``)
    computes what eager computes, statistics included."""
    import torch._dynamo as dynamo

    import jem.method.train
    from jem.method.models import build_model

    monkeypatch.setattr(jem.method.train, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    eager = build_model(tiny_variant().model).train()
    naive, ours = copy.deepcopy(eager), copy.deepcopy(eager)
    x_big, x_small = torch.randn(6, 3, 8, 8), torch.randn(4, 3, 8, 8)
    weight = torch.randn(6, 4)
    expected = _three_forwards_one_backward(eager, x_big, x_small, weight)

    dynamo.reset()
    with dynamo.config.patch(recompile_limit=1, suppress_errors=True):
        naive.blocks.compile(backend="aot_eager", dynamic=False)  # buffers updated in place by the graph
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _three_forwards_one_backward(naive, x_big, x_small, weight)
    dynamo.reset()
    assert jem.method.train.compile_trunk(ours, torch.device("cpu")).startswith("compiled")
    with dynamo.config.patch(recompile_limit=1):
        got = _three_forwards_one_backward(ours, x_big, x_small, weight)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    dynamo.reset()


def test_run_perf_auto_picks_the_verified_fast_path_on_cuda_and_fp32_on_cpu(monkeypatch):
    from types import SimpleNamespace

    from jem.config.errors import ConfigError
    from jem.config.settings import RunSettings
    from jem.config.variant import resolve_perf

    cpu, line = resolve_perf("auto", "cpu")
    assert cpu == PerfConfig(channels_last=True, fused_optimizer=True) and "loss fp32" in line
    gpus = {0: SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0),
            1: SimpleNamespace(name="Tesla V100-SXM2-32GB", major=7, minor=0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpus[torch.device(device).index])
    gpu, line = resolve_perf("auto", torch.device("cuda", 0))
    switches = (gpu.precision, gpu.sampler_precision, gpu.channels_last, gpu.fused_optimizer)
    assert switches == ("bf16", "bf16", True, True)
    assert not gpu.compile, "torch.compile joins auto only once it is measured faster on a GPU"
    assert (gpu.buffer_device, gpu.data_device) == ("auto", "auto")
    assert line == ("auto on CUDA, NVIDIA H100 80GB HBM3 (sm_90) "
                    "(loss bf16, sampler bf16, channels_last, fused optimizer)")
    # before Ampere bf16 is emulated: fp32 there, in the layout cuDNN's fp32 kernels are made for
    old, line = resolve_perf("auto", torch.device("cuda", 1))
    assert old == PerfConfig(fused_optimizer=True)
    assert line == ("auto on CUDA, Tesla V100-SXM2-32GB (sm_70): no native bf16, fp32 "
                    "(loss fp32, sampler fp32, fused optimizer)")
    assert resolve_perf("safe", "cuda")[0] == PerfConfig()
    explicit = PerfConfig(compile=True)
    assert resolve_perf(explicit, "cuda") == (explicit, "explicit run.perf (loss fp32, sampler fp32, compile)")
    with pytest.raises(ConfigError, match=r"run.perf = 'fast': expected 'auto', 'safe' or a mapping"):
        resolve_perf("fast", "cpu")
    settings = RunSettings(perf={"precision": "bf16"})
    settings.validate("run")
    assert settings.perf == PerfConfig(precision="bf16")
    with pytest.raises(ConfigError, match=r"run.perf = 'fast': expected 'auto' or 'safe', or a mapping"):
        RunSettings(perf="fast").validate("run")
    with pytest.raises(ConfigError, match=r"run.perf.precison: unknown key \(did you mean 'precision'\?\)"):
        RunSettings(perf={"precison": "bf16"}).validate("run")


@pytest.mark.parametrize("deferred", [False, True])
def test_grouped_passes_equal_separate_forwards_in_float64(deferred):
    """One forward of [x+, x-, labelled] with per-batch statistics = three forwards in order:
    logits, gradients and every running statistic, in float64 (so any difference is a bug, not
    rounding). ``deferred``: x+ comes before three train-mode sampler forwards in the reference
    order, and the grouped pass applies its update afterwards."""
    from jem.config.variant import ModelConfig
    from jem.method.models import WideResNet
    from jem.method.objectives import bn_snapshot, forward_passes, grouped_passes

    torch.manual_seed(0)
    model = WideResNet(ModelConfig(depth=10, width=1, image_size=8, num_classes=4, bn_momentum=0.9)).double()
    x_pos, x_neg, x_lab = (torch.randn(n, 3, 8, 8, dtype=torch.float64) for n in (6, 5, 8))
    sampler_batches = [torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    pos = a(x_pos) if deferred else None  # separate: x+ first, then the "sampler"
    snapshot = bn_snapshot(b) if deferred else None
    for m in (a, b):
        with torch.no_grad():
            for x in sampler_batches:
                m(x)
    sep = forward_passes(a, x_lab, x_pos, x_neg, pos=pos)
    grp = grouped_passes(b, x_lab, x_pos, x_neg, deferred=snapshot)
    for name in ("pos", "neg", "labelled"):
        torch.testing.assert_close(getattr(grp, name), getattr(sep, name), rtol=0, atol=1e-12)
    for p in (sep, grp):
        (p.pos.logsumexp(1).mean() - p.neg.logsumexp(1).mean() + F.cross_entropy(p.labelled, torch.arange(8) % 4)
         ).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-10, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, rtol=0, atol=1e-12, msg=name)


def test_stages_after_training_take_the_run_perf_layout_and_compute_the_same():
    """sample, evaluate and robustness load the weights channels_last under ``run.perf: auto``
    (contiguous under ``safe``): the same fp32 scores, within float rounding."""
    from jem.evaluation.metrics import predict_logits
    from jem.evaluation.ood import ood_scores
    from jem.method.models import build_model
    from pipeline.weights import model_channels_last

    params = {"scale": "tiny", "scales": {"tiny": {}}, "run": {"perf": "auto"}}
    assert model_channels_last(params, torch.device("cpu"))
    assert not model_channels_last({**params, "run": {"perf": "safe"}}, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(tiny_variant().model)
    model(torch.randn(16, 3, 8, 8))  # running statistics that are not the initial ones
    model.eval()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(predict_logits(nhwc, images, 8), predict_logits(model, images, 8), rtol=1e-4, atol=1e-5)
    a, b = ood_scores(nhwc, images, 8), ood_scores(model, images, 8)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
