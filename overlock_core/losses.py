"""Deep-supervision loss: the classifier in training returns (main, aux) when it has an auxiliary head."""
from typing import Tuple, Union

import torch
import torch.nn as nn


class DeepSupervisionLoss(nn.Module):
    """loss = base(main, target) + aux_weight * base(aux, target); a plain tensor output is passed through.

    Works with any target form the base loss takes (hard labels, or mixup/cutmix soft targets with
    ``timm.loss.SoftTargetCrossEntropy``). The authors use aux_weight 0.4.
    """

    def __init__(self, base_loss: nn.Module, aux_weight: float = 0.4):
        super().__init__()
        self.base_loss = base_loss
        self.aux_weight = aux_weight

    def forward(self, output: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor):
        if isinstance(output, (tuple, list)):
            main, aux = output
            return self.base_loss(main, target) + self.aux_weight * self.base_loss(aux, target)
        return self.base_loss(output, target)
