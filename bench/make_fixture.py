"""Writes the PyTorch fixtures that tests/vae.rs loads (run with bench/.venv/bin/python).

tests/fixtures/simplevae_torch.safetensors     SimpleVAE().state_dict(), as PyTorch saves it
                                               (safetensors.torch.save_file, no metadata)
tests/fixtures/simplevae_torch_io.safetensors  inputs x [4,784], noise eps [4,32] and the text's
                                               outputs: mu, logvar, recon, and vae_loss (sum)
The model and loss are the text's code, verbatim (variational-inference-primer, "vae.py").
"""
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class SimpleVAE(nn.Module):
    def __init__(self, input_dim=784, latent_dim=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, 256), nn.ReLU())
        self.fc_mu = nn.Linear(256, latent_dim)
        self.fc_logvar = nn.Linear(256, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, input_dim))

    def reparameterize(self, mu, logvar, eps):
        std = torch.exp(0.5 * logvar)
        return mu + eps * std

    def forward(self, x, eps):
        h = self.encoder(x.view(-1, 784))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparameterize(mu, logvar, eps)
        recon = torch.sigmoid(self.decoder(z))
        return recon, mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def main():
    torch.manual_seed(0)
    model = SimpleVAE()
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "simplevae_torch.safetensors"))
    x = torch.rand(4, 784)
    eps = torch.randn(4, 32)
    with torch.no_grad():
        recon, mu, logvar = model(x, eps)
        loss = vae_loss(recon, x, mu, logvar)
    save_file(
        {"x": x, "eps": eps, "mu": mu, "logvar": logvar, "recon": recon, "loss": loss.reshape(1)},
        str(out / "simplevae_torch_io.safetensors"),
    )
    print("loss", loss.item())


if __name__ == "__main__":
    main()
