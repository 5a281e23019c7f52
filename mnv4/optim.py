"""Optimizer helpers: weight-decay groups and an exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import LayerScale2d

# Parameters that timm's optimizer factory and torchvision's references leave out of weight decay, chosen by the
# owning module's kind and the parameter's name, not by ndim: a layer-scale gamma is (C, 1, 1). Written here
# because torchvision's helper (ops._utils.split_normalization_params) is private and ignores biases.
NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LayerScale2d)


def weight_decay_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: `weight_decay` for conv and linear weights, `norm_weight_decay` for norm
    weights and biases, every bias and layer-scale gammas (the notebook decayed everything alike)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            exempt = isinstance(module, NO_DECAY_MODULES) or name == "bias"
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": norm_weight_decay}]


class ModelEma(nn.Module):
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics too), with timm
    ModelEmaV3's warm-up: update t uses decay min(decay, (1 + t) / (10 + t)), so the average follows the
    fast-moving early weights instead of staying near the initial ones for ~1/(1 - decay) steps.

    It computes what torch.optim.swa_utils.AveragedModel does with that decay (a test holds the two equal) and
    keeps its state layout ('module.*', 'n_averaged'). Written here because AveragedModel tests and copies its
    update count, a tensor, at every update, which on a GPU makes the host wait each step; this one counts on
    the host."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # on the CPU, like AveragedModel's
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module):
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.updates == 0:
            for average, value in zip(averaged, current, strict=True):
                average.copy_(value)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            floats = [(a, v) for a, v in zip(averaged, current, strict=True) if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [v for _, v in floats], 1 - decay)
            for average, value in zip(averaged, current):
                if not average.is_floating_point():  # BatchNorm's batch counter, averaged as AveragedModel does
                    average.copy_(average * decay + value * (1 - decay))
        self.updates += 1
        self.n_averaged.fill_(self.updates)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)
        return result
