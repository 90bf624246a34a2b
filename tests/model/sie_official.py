"""A faithful transcription of facebookresearch/SIE's loss (`src/models.py`, `SIE.forward` from the
projections on, single process: FullGatherLayer is the identity) and predictor (`src/hypernetwork.py`,
`ParametrizedNet` with `HyperNet`, args.hypernetwork="linear", bias_hypernet=False, bias_pred=False,
predictor="" and predictor_relu=False: the defaults). Kept as the oracle of tests/model/test_model_losses.py;
nothing in the product imports it. Variable names are the official ones."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class HyperNet(nn.Module):
    def __init__(self, latent_size: int, output_size: int, args):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_size, output_size, bias=args.bias_hypernet))

    def forward(self, x):
        return self.net(x)


class ParametrizedNet(nn.Module):
    def __init__(self, equivariant_size: int, latent_size: int, args):
        super().__init__()
        archi_str = str(equivariant_size) + "-" + str(equivariant_size)
        self.predictor = [int(x) for x in archi_str.split("-")]
        self.args = args
        self.num_weights_each = [
            self.predictor[i] * self.predictor[i + 1] for i in range(len(self.predictor) - 1)
        ]
        self.num_params_each = self.num_weights_each
        self.cum_params = [0] + list(np.cumsum(self.num_params_each))
        self.hypernet = HyperNet(latent_size, int(self.cum_params[-1]), self.args)
        self.activation = nn.Identity()

    def forward(self, x, z):
        weights = self.hypernet(z)
        out = x
        for i in range(len(self.predictor) - 1):
            w = weights[..., self.cum_params[i] : self.cum_params[i] + self.num_weights_each[i]].view(
                -1, self.predictor[i + 1], self.predictor[i]
            )
            out = torch.bmm(out, torch.transpose(w, -2, -1))
            if i < len(self.predictor) - 2:
                out = self.activation(out)
        return out.squeeze()


def default_args(batch_size: int) -> SimpleNamespace:
    """main.py's defaults for the loss and the predictor."""
    return SimpleNamespace(
        sim_coeff=10.0,
        equi_factor=4.5,
        std_coeff=10.0,
        cov_coeff=1.0,
        batch_size=batch_size,
        bias_hypernet=False,
        bias_pred=False,
        hypernetwork="linear",
        predictor="",
        predictor_relu=False,
    )


def sie_forward_loss(args, x_inv, y_inv, x_equi, y_equi, predictor, z):
    """SIE.forward after the projectors: the loss and its terms."""
    x = torch.cat((x_inv, x_equi), dim=1)
    y = torch.cat((y_inv, y_equi), dim=1)
    repr_loss_inv = F.mse_loss(x_inv, y_inv)
    y_equi_pred = predictor(x_equi.unsqueeze(1), z)
    repr_loss_equi = F.mse_loss(y_equi_pred, y_equi)

    y_equi_pred = y_equi_pred - y_equi_pred.mean(dim=0)
    std_y_equi_pred = torch.sqrt(y_equi_pred.var(dim=0) + 0.0001)
    pred_std_loss = torch.mean(F.relu(1 - std_y_equi_pred)) / 2

    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (args.batch_size - 1)
    cov_y = (y.T @ y) / (args.batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(cov_x.shape[0]) + off_diagonal(cov_y).pow_(2).sum().div(
        cov_x.shape[0]
    )
    loss = (
        args.sim_coeff * repr_loss_inv
        + args.equi_factor * args.sim_coeff * repr_loss_equi
        + args.std_coeff * std_loss
        + args.std_coeff * pred_std_loss
        + args.cov_coeff * cov_loss
    )
    return loss, {
        "repr_loss_inv": repr_loss_inv,
        "repr_loss_equi": repr_loss_equi,
        "std_loss": std_loss,
        "pred_std_loss": pred_std_loss,
        "cov_loss": cov_loss,
    }
