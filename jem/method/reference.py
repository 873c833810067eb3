"""The reference scripts' training iteration, written plainly from them.

JEM: wgrathwohl/JEM ``train_wrn_ebm.py``; JEM++: sndnyang/JEMPP ``train_jempp.py``; SADA-JEM:
sndnyang/SADAJEM ``train_sadajem.py``; the softmax baselines as those scripts run with the
p(x) term off. ``ReferenceLoop.step`` does what one iteration of those scripts does, in their
order and with their own idioms: the replay buffer in CPU memory (rows gathered, mixed with a
full batch of p0 draws, moved to the device, written back), its own sampler loop (``x.data +=``
updates, a first-layer forward and backward per PYLD inner step), the loss of separate
forwards, SAM's perturb and restore parameter by parameter, a plain ``torch.optim`` optimizer
in fp32, eager.

Two users: ``tests/test_parity.py`` runs it side by side with ``jem.method.train.Trainer`` (feeding
it our buffer slots and random states, ``draw=``/``sampler_rng=``) and compares every state;
``jem-bench --compare`` times it as the *reference* row, the speed the published code runs at,
so that the baseline and fast rows are measured against it in the same process.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from jem.config.variant import Variant
from jem.method.gmm import InitDistribution
from jem.method.models import WideResNet


def lse(f: WideResNet, x: torch.Tensor) -> torch.Tensor:
    """The scripts' ``f(x)``: CCF.forward = logsumexp of the classifier's logits."""
    return f(x).logsumexp(1)


def ref_sgld(f: WideResNet, x0: torch.Tensor, v: Variant) -> torch.Tensor:
    s = v.sampler
    if v.family == "jem":  # train_wrn_ebm.py: eval mode, x += lr * grad + std * randn, no clamps
        f.eval()
        x_k = x0.clone().requires_grad_(True)
        for _ in range(s.steps):
            f_prime = torch.autograd.grad(lse(f, x_k).sum(), [x_k], retain_graph=True)[0]
            x_k.data += s.step_size * f_prime + s.noise * torch.randn_like(x_k)
        f.train()
        return x_k.detach()
    # train_sadajem.py: train mode (running statistics updated at every step), clamped gradient,
    # noise, then the image clamp
    x_k = x0.clone().requires_grad_(True)
    for _ in range(s.steps):
        eta = torch.autograd.grad(lse(f, x_k).sum(), [x_k], retain_graph=True)[0]
        x_k.data = (x_k + torch.clamp(eta, -s.grad_clamp, s.grad_clamp) * s.step_size).data
        if s.noise > 0:
            x_k.data += s.noise * torch.randn_like(x_k)
        x_k.data = torch.clamp(x_k.data, -1, 1)
    f.train()
    return x_k.detach()


def ref_pyld(f: WideResNet, x0: torch.Tensor, v: Variant) -> torch.Tensor:
    """train_jempp.py sample_q with sgld_lr = 0: M outer steps in train mode, each one full
    forward/backward for p = dLSE/d(layer_one_out), then N inner steps through the first layer
    (the Hamiltonian sum(layer_one(x) * p)), clamped gradient and image; noise after them. (The
    script's closing ``-H.backward()`` only fills conv1's .grad, which ``optim.zero_grad()``
    erases before the loss backward.)"""
    s = v.sampler
    eps = s.grad_clamp
    x_k = x0.clone().requires_grad_(True)
    for _ in range(s.steps):
        layer_one_out = f.stem(x_k)
        e_x = f.logits_from_stem(layer_one_out).logsumexp(1).sum()
        _, p = torch.autograd.grad(e_x, [x_k, layer_one_out], retain_graph=True)
        p = p.detach()
        tmp = x_k.data.clone().requires_grad_(True)
        for _ in range(s.inner_steps):
            h = (f.stem(tmp) * p).sum()
            eta_grad = torch.autograd.grad(h, [tmp], only_inputs=True, retain_graph=True)[0]
            tmp.data = tmp.data + torch.clamp(eta_grad, -eps, eps) * s.inner_step_size
            tmp = torch.clamp(tmp, -1, 1)
        x_k.data = tmp.data
        if s.noise > 0:
            x_k.data += s.noise * torch.randn_like(x_k)
    f.train()
    return x_k.detach()


class ReferenceLoop:
    """The reference training state: network, optimizer, replay buffer (in CPU memory, as the
    scripts keep it), iteration counter."""

    def __init__(self, variant: Variant, model: WideResNet, buffer: torch.Tensor | None,
                 iters_per_epoch: int, p0: InitDistribution | None = None) -> None:
        v = self.v = variant
        self.f = model
        self.device = next(model.parameters()).device
        o = v.optim
        if o.name == "sgd":
            self.optim: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                                                weight_decay=o.weight_decay)
        else:
            self.optim = torch.optim.Adam(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.buffer = buffer
        self.p0 = p0
        self.cur_iter = 0
        self.per_epoch = iters_per_epoch
        self.lr = o.lr

    @classmethod
    def from_trainer(cls, trainer: Any) -> ReferenceLoop:
        """A copy of ``trainer``'s network, replay buffer (moved to CPU memory) and p0."""
        buffer = trainer.buffer
        return cls(trainer.variant, copy.deepcopy(trainer.model),
                   buffer.samples.detach().to("cpu", copy=True) if buffer is not None else None,
                   trainer.iters_per_epoch, buffer.p0 if buffer is not None else None)

    def set_lr(self) -> None:
        """The scripts: decay at the start of each epoch in decay_epochs, then the warm-up
        ``lr = args.lr * cur_iter / warmup_iters`` while cur_iter <= warmup_iters."""
        o = self.v.optim
        if self.cur_iter % self.per_epoch == 0 and self.cur_iter // self.per_epoch in o.milestones:
            self.lr *= o.gamma
        if self.cur_iter <= o.warmup_iters:
            self.lr = o.lr * self.cur_iter / float(o.warmup_iters)
        for group in self.optim.param_groups:
            group["lr"] = self.lr

    def sample_p_0(self, bs: int, draw: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer rows at random slots, each replaced by a p0 draw where ``rand(bs) <
        reinit_freq`` (the global generator, as the scripts draw it); moved to the device.

        ``draw`` (the parity test) gives the slots, the global random state before the mask
        and the fresh p0 rows our buffer drew; without it the slots and a full batch of p0
        draws are drawn here, as the scripts do."""
        assert self.buffer is not None
        if draw is None:
            assert self.p0 is not None
            inds = torch.randint(0, len(self.buffer), (bs,))
            buffer_samples = self.buffer[inds]
            random_samples = self.p0.sample(bs, device="cpu")[0]
            choose = torch.rand(bs) < self.v.buffer.reinit_freq
        else:
            inds = draw["idx"].cpu()
            buffer_samples = self.buffer[inds]
            torch.set_rng_state(draw["rng"])
            choose = torch.rand(bs) < self.v.buffer.reinit_freq
            random_samples = torch.zeros_like(buffer_samples)
            if draw["fresh"]:
                random_samples[choose] = draw["fresh"][0].cpu()
        choose_random = choose.float()[:, None, None, None]
        samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
        return samples.to(self.device), inds

    def step(self, x_lab: torch.Tensor, y_lab: torch.Tensor, x_p_d: torch.Tensor | None,
             draw: dict[str, Any] | None = None, sampler_rng: torch.Tensor | None = None) -> torch.Tensor | None:
        """One iteration of the script; returns the sampler's output (None without p(x))."""
        v, f = self.v, self.f
        x_lab, y_lab = x_lab.to(self.device), y_lab.to(self.device)
        self.set_lr()
        generative = v.objective.generative
        sam = v.optim.sam != "none"
        fp = x_q = None
        if generative:
            assert x_p_d is not None
            x_p_d = x_p_d.to(self.device)
        # train_jempp.py --plc alltrain1 and train_sadajem.py: f(x_p_d) before the sampler
        if generative and v.objective.pos_forward == "before_sampler":
            fp = lse(f, x_p_d).mean()
        if generative:
            x0, inds = self.sample_p_0(v.train.px_batch_size, draw)
            if sampler_rng is not None:
                torch.set_rng_state(sampler_rng)
            x_q = ref_pyld(f, x0, v) if v.sampler.kind == "pyld" else ref_sgld(f, x0, v)
            self.buffer[inds] = x_q.cpu()
            if fp is None:  # train_wrn_ebm.py: after the sampler
                fp = lse(f, x_p_d).mean()
            fq = lse(f, x_q).mean()
            # train_sadajem.py: the l2_coeff term in the first pass, left out of SAM's second (below)
            loss = -(fp - fq) + v.objective.energy_l2 * (fp ** 2 + fq ** 2)
        else:
            loss = torch.zeros((), device=self.device)
        logits = f(x_lab)  # f.classify(x_lab), always last
        loss = loss + F.cross_entropy(logits, y_lab)
        self.optim.zero_grad()
        loss.backward()
        if sam:  # sam.py: first_step, the second pass with momentum 0, second_step
            adaptive = v.optim.sam == "asam"
            params = [p for p in f.parameters() if p.grad is not None]
            with torch.no_grad():
                grad_norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2)
                                                    for p in params]), p=2)
                scale = v.optim.rho / (grad_norm + 1e-12)
                old = {}
                for p in params:
                    old[p] = p.data.clone()
                    p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale)
            self.optim.zero_grad()
            bns = [m for m in f.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for m in bns:  # disable_running_stats
                m.backup_momentum, m.momentum = m.momentum, 0
            loss2 = torch.zeros((), device=self.device)
            if generative:
                loss2 = loss2 - (lse(f, x_p_d).mean() - lse(f, x_q).mean())
            loss2 = loss2 + F.cross_entropy(f(x_lab), y_lab)
            loss2.backward()
            for m in bns:  # enable_running_stats
                m.momentum = m.backup_momentum
            with torch.no_grad():
                for p in params:
                    p.data = old[p]
            self.optim.step()
            self.optim.zero_grad()
        else:
            self.optim.step()
        self.cur_iter += 1
        return x_q
