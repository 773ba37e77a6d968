"""The text's SimpleVAE + vae_loss trained with Adam in PyTorch on elbo's built-in data split
(first 9,000 of data/mnist-10k for training, last 1,000 for test), for side-by-side numbers.

    bench/.venv/bin/python bench/torch_vae.py --epochs 10 [--threads 2]

Prints per-epoch train and test -ELBO (nats per example) and the wall time of training.
"""
import argparse
import gzip
import pathlib
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_images(path):
    raw = gzip.open(path, "rb").read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    assert magic == 2051 and rows == 28 and cols == 28
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 784).astype(np.float32) / 255.0


class SimpleVAE(nn.Module):
    def __init__(self, input_dim=784, latent_dim=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, 256), nn.ReLU())
        self.fc_mu = nn.Linear(256, latent_dim)
        self.fc_logvar = nn.Linear(256, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, input_dim))

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        h = self.encoder(x.view(-1, 784))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparameterize(mu, logvar)
        recon = torch.sigmoid(self.decoder(z))
        return recon, mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x = torch.from_numpy(load_images(ROOT / "data/mnist-10k/train-images-idx3-ubyte.gz"))
    train, test = x[:9000], x[9000:]
    model = SimpleVAE()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    started = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train)).split(a.batch_size):
            xb = train[idx]
            recon, mu, logvar = model(xb)
            loss = vae_loss(recon, xb, mu, logvar)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        with torch.no_grad():
            recon, mu, logvar = model(test)
            test_loss = vae_loss(recon, test, mu, logvar).item() / len(test)
        print(f"epoch {epoch}: train -ELBO {total / len(train):.2f} | test -ELBO {test_loss:.2f}")
    print(f"trained in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
