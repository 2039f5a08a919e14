"""Training after the decision point on the physically slimmed model.

Once the gates are fixed, the gated model computes exactly what its slimmed copy computes (the slim
stage's guarantee), so the remaining steps can train the small dense model instead of the full-width
masked one: the speed and memory of a plain loop on the pruned model. The gated model stays the record.
`sync()` writes the slim model's weights, buffers and SGD momentum back into the gated model's tensors
at the kept positions, so checkpoints, `--resume` and the slim stage see the format they always did,
and a resumed run rebuilds the same slim model from them.

The positions are found by slimming a copy of the model whose every floating tensor holds its own
element indices (float64 is exact up to 2**53): whatever the surgery selects, the copy's values say
from where. So this module never repeats the surgery's rules, and it follows any slice kind it learns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import VerificationError
from prunekit.gates import get_gates, plan_from_gates, ungated_copy
from prunekit.graph import ChannelGraph
from prunekit.modes import training_flags
from prunekit.parity import compare_outputs
from prunekit.plan import ChannelPlan
from prunekit.surgery import slim_

# The check at entry runs on the training device, where TF32 convolutions and other kernels differ
# from the CPU's in the fourth digit; a surgery error differs in the first. The slim stage later
# verifies the final model on the CPU at its strict tolerance.
ENTRY_RTOL = 1e-2


@dataclass
class _Slot:
    """One tensor of the slim model and where its elements live in the gated model's tensor."""

    full: torch.Tensor
    slim: torch.Tensor
    index: torch.Tensor | None  # flat positions in `full`; None: the tensor is copied whole


def element_positions(
    plain: nn.Module, graph: ChannelGraph, plan: ChannelPlan
) -> dict[str, torch.Tensor | None]:
    """For every state_dict entry of `plain` slimmed by `plan`, the flat positions of its elements in
    the unslimmed tensor of the same name (None for a non-floating tensor, which is not sliced)."""
    coded = copy.deepcopy(plain).to("cpu", torch.float64)
    with torch.no_grad():
        for t in (*coded.parameters(), *coded.buffers()):
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=torch.float64).view_as(t))
    slim_(coded, graph, plan)
    return {
        name: t.flatten().long() if t.is_floating_point() else None for name, t in coded.state_dict().items()
    }


class DensePhase:
    """The slimmed twin of a decided gated model, trained in its place.

    `model` is the gated model (decided); `optimizer` the SGD over its weights, whose momentum the
    twin's own SGD starts from and gives back on `sync()`."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, optimizer: torch.optim.Optimizer) -> None:
        bank = get_gates(model)
        if bank is None or not bank.is_decided:
            raise ValueError("a dense phase needs a gated model whose decisions are fixed")
        self.gated, self.full_opt = model, optimizer
        plan = plan_from_gates(graph, bank)
        bank.current = bank.current_ext = None  # the last forward's activity: part of its autograd graph
        plain = ungated_copy(model)
        positions = element_positions(plain, graph, plan)
        self.model = slim_(plain, graph, plan)
        full_state = model.state_dict(keep_vars=True)
        slim_state = self.model.state_dict(keep_vars=True)
        self._slots = {
            name: _Slot(
                full_state[name], t, None if positions[name] is None else positions[name].to(t.device)
            )
            for name, t in slim_state.items()
        }
        group = optimizer.param_groups[0]
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=group["lr"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
        )
        self._params = [(self._slots[n], p) for n, p in self.model.named_parameters()]
        with torch.no_grad():  # the momentum so far, at the kept positions
            for slot, p in self._params:
                buf = optimizer.state.get(slot.full, {}).get("momentum_buffer")
                if buf is not None:
                    self.optimizer.state[p]["momentum_buffer"] = self._take(slot, buf)

    @staticmethod
    def _take(slot: _Slot, full: torch.Tensor) -> torch.Tensor:
        if slot.index is None:
            return full.detach().clone()
        return full.detach().flatten()[slot.index].view_as(slot.slim).clone()

    @staticmethod
    def _put(slot: _Slot, full: torch.Tensor, values: torch.Tensor) -> None:
        if slot.index is None:
            full.copy_(values)
        else:
            full.view(-1)[slot.index] = values.detach().flatten().to(full.dtype)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def verify(self, x: torch.Tensor) -> None:
        """The twin must compute what the gated model does (eval mode, on `x`): a mismatch is an error."""
        with training_flags(self.gated), training_flags(self.model):
            self.gated.eval()
            self.model.eval()
            reference = self.gated(x)
            if not torch.isfinite(reference).all():
                return  # diverged weights: the training loop's non-finite check names them
            parity = compare_outputs(reference, self.model(x), ENTRY_RTOL)
        if not parity.ok:
            raise VerificationError(
                "the slimmed model for the rest of fine-tuning differs from the gated one: "
                + parity.describe()
            )

    @torch.no_grad()
    def sync(self) -> None:
        """Write the twin's weights, buffers and momentum into the gated model and its optimiser."""
        for slot in self._slots.values():
            self._put(slot, slot.full, slot.slim)
        for slot, p in self._params:
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                continue
            state = self.full_opt.state[slot.full]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(slot.full)
            self._put(slot, state["momentum_buffer"], buf)


__all__ = ["DensePhase", "element_positions"]
