"""RQ-VAE: residual vector quantisation of item embeddings into short code tuples.

An MLP encoder maps an embedding ``x`` (dim E) to a latent ``z`` (dim D); ``levels`` codebooks of
``codebook_size`` vectors quantise it residually: level 1 picks the codeword nearest to ``z``,
level 2 the one nearest to what is left, and so on. The decoder reconstructs ``x`` from the sum
of the chosen codewords. Training: reconstruction MSE + codebook loss + ``beta`` x commitment loss,
with the straight-through estimator. Codebooks start from k-means on the (residual) latents, and
codewords unused for a while are re-seeded from random residuals (keeps utilisation high).

Items whose tuples collide get an extra level (0, 1, 2, ... within each colliding group), so every
item has a unique ID (:func:`resolve_collisions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class RQVAEConfig:
    levels: int = 3
    codebook_size: int = 256
    latent_dim: int = 32
    hidden: int = 256
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    beta: float = 0.25
    kmeans_iters: int = 25
    reseed_every: int = 200  # steps between re-seeding unused codewords (0 = never)
    seed: int = 0


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """(k, D) centroids of ``x`` (N, D) by Lloyd's algorithm from k-means++-lite seeding.

    With fewer points than ``k`` the points are repeated (plus tiny noise) to fill the codebook.
    """
    n = x.shape[0]
    if n <= k:
        reps = x[torch.arange(k) % n]
        return reps + 1e-3 * torch.randn(reps.shape, generator=gen)
    # seeding: first centre at random, the rest sampled proportionally to squared distance
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = ((x - centres[0]) ** 2).sum(1)  # (N,)
    # sample the remaining k-1 centres in a few rounds (cheaper than k sequential picks)
    while centres.shape[0] < k:
        need = min(k - centres.shape[0], max(1, k // 8))
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs, need, replacement=False, generator=gen)
        centres = torch.cat([centres, x[idx]])
        d2 = torch.minimum(d2, torch.cdist(x, x[idx]).pow(2).min(1).values)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)  # (N,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters at random points
            centres[empty] = x[torch.randint(n, (int(empty.sum()),), generator=gen)]
    return centres


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.latent_dim
        self.encoder = nn.Sequential(nn.Linear(in_dim, h), nn.ReLU(), nn.Linear(h, h // 2), nn.ReLU(),
                                     nn.Linear(h // 2, d))
        self.decoder = nn.Sequential(nn.Linear(d, h // 2), nn.ReLU(), nn.Linear(h // 2, h), nn.ReLU(),
                                     nn.Linear(h, in_dim))
        self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, d))  # (Lv, K, D)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (N, D) -> (z_q (N, D) straight-through, codes (N, Lv) int64, vq loss scalar)."""
        residual = z
        z_q = torch.zeros_like(z)
        codes = []
        loss = z.new_zeros(())
        for lv in range(self.cfg.levels):
            book = self.codebooks[lv]  # (K, D)
            idx = torch.cdist(residual.detach(), book.detach()).argmin(1)  # (N,)
            q = book[idx]  # (N, D)
            loss = loss + F.mse_loss(q, residual.detach()) + self.cfg.beta * F.mse_loss(residual, q.detach())
            z_q = z_q + q
            residual = residual - q.detach()
            codes.append(idx)
        z_st = z + (z_q - z).detach()  # straight-through: forward z_q, gradient to z
        return z_st, torch.stack(codes, 1), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, E) -> (x_hat (N, E), loss, recon loss, codes (N, Lv))."""
        z = self.encoder(x)  # (N, D)
        z_q, codes, vq = self.quantize(z)
        x_hat = self.decoder(z_q)  # (N, E)
        recon = F.mse_loss(x_hat, x)
        return x_hat, recon + vq, recon, codes

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, gen: torch.Generator) -> None:
        """k-means on the latents, level by level on the residuals."""
        residual = self.encoder(x)
        for lv in range(self.cfg.levels):
            centres = kmeans(residual, self.cfg.codebook_size, self.cfg.kmeans_iters, gen)
            self.codebooks.data[lv] = centres
            residual = residual - centres[torch.cdist(residual, centres).argmin(1)]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) -> codes (N, Lv) int64."""
        return self.quantize(self.encoder(x))[1]


def resolve_collisions(codes: np.ndarray) -> np.ndarray:
    """(N, Lv) codes -> (N, Lv+1) unique tuples: the extra level numbers items within each
    group sharing a tuple (0 for the first item by id, 1 for the next, ...)."""
    codes = np.asarray(codes, dtype=np.int64)
    extra = np.zeros(len(codes), dtype=np.int64)
    seen: dict[tuple[int, ...], int] = {}
    for i, row in enumerate(map(tuple, codes.tolist())):
        extra[i] = seen.get(row, 0)
        seen[row] = extra[i] + 1
    return np.concatenate([codes, extra[:, None]], axis=1)


def code_stats(codes: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Collision rate (share of items whose tuple is not unique), groups, utilisation per level."""
    codes = np.asarray(codes)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    colliding = counts[inverse] > 1
    return {
        "items": len(codes),
        "unique_tuples": len(counts),
        "collision_rate": float(colliding.mean()) if len(codes) else 0.0,
        "max_group": int(counts.max()) if len(counts) else 0,
        "utilization": [float(len(np.unique(codes[:, lv])) / codebook_size) for lv in range(codes.shape[1])],
    }


def train_rqvae(emb: np.ndarray, cfg: RQVAEConfig, progress: bool = False) -> tuple[RQVAE, np.ndarray, dict[str, Any]]:
    """Fit an RQ-VAE on ``emb`` (N, E); returns (model, codes (N, Lv+1) unique, statistics)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RQVAE(emb.shape[1], cfg)
    x = torch.from_numpy(np.asarray(emb, dtype=np.float32))
    n = x.shape[0]
    model.init_codebooks(x, gen)
    with torch.no_grad():
        _, loss0, recon0, _ = model(x)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    usage = torch.zeros(cfg.levels, cfg.codebook_size)
    losses = []
    bar = tqdm(total=cfg.steps, desc="rq-vae", unit="step", disable=not progress, dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
        _, loss, _recon, codes = model(x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for lv in range(cfg.levels):
            usage[lv] += torch.bincount(codes[:, lv], minlength=cfg.codebook_size).float()
        if cfg.reseed_every and step % cfg.reseed_every == 0 and step < cfg.steps * 0.8:
            _reseed_dead(model, x, usage, gen)
            usage.zero_()
        if step % max(1, cfg.steps // 20) == 0:
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    with torch.no_grad():
        _, loss1, recon1, raw = model(x)
    raw_np = raw.numpy()
    stats = code_stats(raw_np, cfg.codebook_size)
    stats.update({
        "loss_before": float(loss0), "loss_after": float(loss1),
        "recon_mse_before": float(recon0), "recon_mse_after": float(recon1),
        "loss_curve": losses, "levels": cfg.levels, "codebook_size": cfg.codebook_size,
    })
    final = resolve_collisions(raw_np)
    stats["extra_level_size"] = int(final[:, -1].max()) + 1 if len(final) else 1
    return model, final, stats


@torch.no_grad()
def _reseed_dead(model: RQVAE, x: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> None:
    """Move codewords unused since the last check onto residuals of random items."""
    sample = x[torch.randint(x.shape[0], (min(4096, x.shape[0]),), generator=gen)]
    residual = model.encoder(sample)
    for lv in range(model.cfg.levels):
        book = model.codebooks.data[lv]
        dead = torch.nonzero(usage[lv] == 0).flatten()
        if len(dead):
            pick = torch.randint(residual.shape[0], (len(dead),), generator=gen)
            book[dead] = residual[pick] + 1e-3 * torch.randn(len(dead), book.shape[1], generator=gen)
        residual = residual - book[torch.cdist(residual, book).argmin(1)]
