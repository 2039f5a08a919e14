"""Optimisers for the gate logits."""

from __future__ import annotations

import torch


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate is one number per parameter tensor rather than one per
    element. Every gate's step keeps its gradient's size relative to the other gates', so the
    activation loss's push (a gate's share of the MACs) and the task loss's pull (its channels'
    first-order importance) are weighed against each other as the objective states them. Per-element
    Adam divides each gate's gradient by its own scale instead, so a gate whose MAC push is steady can
    move at the full rate however important its channels are. The hypothesis this tests: that this is
    why the learned cut falls on the expensive layers. Measured on the CIFAR fixture it made no
    difference on top of the floors (docs/recipe.md), so it is an option, not the default."""

    def __init__(
        self,
        params,
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).add_(g.pow(2).mean(), alpha=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1**t)
                v_hat = state["exp_avg_sq"] / (1 - b2**t)
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])
        return loss
