"""A mixture of trained llmrec models, its weights chosen on validation.

Each member (any registered model: ItemKNN, SASRec, llm-seqrec, an LLM family, ...) is fitted on
the same split. Their score rows are put on one scale (``zscore``: each row centred and divided by
its standard deviation over the catalog; ``rank``: each item's rank in the row, best = 1, turned
into ``1 / (rank_offset + rank)``, reciprocal-rank fusion), and the mixture's score is

    score = z_0 + w_1 * z_1 + w_2 * z_2 + ...

The weights are chosen greedily, member after member, each from ``weight_grid`` by NDCG@10 on the
validation users (``valid_users`` of them, a fixed seeded sample, or all): ``split.test`` is never
read. A weight of 0 leaves a member out, so the mixture is never chosen worse on validation than
its first member.

A member is either fitted here (``name`` and its ``params``) or read from a trained run directory
(``run``, e.g. ``runs/sasrec``; any model, a mixture included, or with ``member = i`` the i-th member
of a trained mixture), which must have been trained on the same split: combining trained runs costs
only their scoring. Such a run must exist whenever the mixture is built or loaded; its weights are
saved inside the mixture.

The default weight grid is denser near 0 than above 1: a sparse scorer such as ItemKNN, z-scored, is
peaked, and its best weight beside a dense one is often small.

Id spaces: dataset items ``0..n_items-1``; score matrices ``(n_histories, n_items)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.data.splits import Split
from llmrec.eval.metrics import mean_ndcg
from llmrec.models.base import Recommender, top_k
from llmrec.models.train import say


@dataclass
class MixtureMember:
    """One member: a registered model name and its own config keys (checked by that model's config), or
    ``run``: the directory of a trained llmrec run (``name``, if given, must be its model's), and with
    ``member >= 0`` that member of the run's mixture."""

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    run: str = ""
    member: int = -1  # with run: -1 = the run's whole model, i >= 0 = member i of the run's mixture


@dataclass
class MixtureConfig:
    members: list[MixtureMember] = field(
        default_factory=lambda: [MixtureMember("llm-seqrec"), MixtureMember("itemknn")])
    weight_grid: list[float] = field(
        default_factory=lambda: [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0])
    norm: Literal["zscore", "rank"] = "zscore"
    rank_offset: float = 60.0  # reciprocal-rank fusion's constant (norm = "rank")
    valid_users: int = 0  # validation users that choose the weights (0 = all)
    seed: int = 0  # passed to every member whose config has a seed and does not set one

    def __post_init__(self) -> None:
        if len(self.members) < 1:
            raise ValueError("members: a mixture needs at least one member")
        for i, m in enumerate(self.members):
            if m.run and m.params:
                raise ValueError(f"members[{i}]: give params (a model fitted here) or run (a trained run), not both")
            if m.member >= 0 and not m.run:
                raise ValueError(f"members[{i}]: member = {m.member} picks a member of a trained run; give run too")
            if not m.run and not m.name:
                raise ValueError(f"members[{i}]: needs name (a registered model) or run (a trained run directory)")
            if m.name == "mixture" and not m.run:
                raise ValueError(f"members[{i}]: a mixture cannot contain a mixture (except a trained run of one)")
        if not self.weight_grid or any(not w >= 0 for w in self.weight_grid):
            raise ValueError(f"weight_grid must hold weights >= 0, got {self.weight_grid}")
        if self.valid_users < 0 or self.rank_offset <= 0:
            raise ValueError("valid_users must be >= 0 and rank_offset > 0")


def normalise_rows(scores: np.ndarray, how: str, rank_offset: float = 60.0) -> np.ndarray:
    """(n, n_items) -> (n, n_items) float32 on a common scale (see the module docstring); -inf/NaN
    entries become the row's lowest value first. Row statistics are accumulated in float64."""
    s = np.array(scores, dtype=np.float32, copy=True)
    bad = ~np.isfinite(s)
    if bad.any():
        low = np.where(bad, np.inf, s).min(axis=1, keepdims=True)
        s[bad] = np.broadcast_to(np.where(np.isfinite(low), low, 0.0), s.shape)[bad]
    if how == "zscore":
        mean = s.mean(axis=1, keepdims=True, dtype=np.float64)
        sd = s.std(axis=1, keepdims=True, dtype=np.float64)
        flat = sd <= 1e-6 * (np.abs(s).max(axis=1, keepdims=True) + 1.0)  # a constant row (up to rounding)
        s -= mean.astype(np.float32)
        s /= np.where(flat, 1.0, sd).astype(np.float32)
        s[np.broadcast_to(flat, s.shape)] = 0.0
        return s
    if how == "rank":
        order = np.argsort(-s, axis=1, kind="stable")
        ranks = np.empty_like(s)
        np.put_along_axis(ranks, order, np.arange(1, s.shape[1] + 1, dtype=np.float32)[None, :], axis=1)
        return (1.0 / (rank_offset + ranks)).astype(np.float32)
    raise ValueError(f"unknown norm {how!r}")


def _run_member(member: MixtureMember, i: int, n_items: int) -> Recommender:
    """An unfitted model of the kind and config saved in run ``member.run`` (weights: :func:`_load_run_member`)."""
    import json

    from llmrec.config import ConfigError
    from llmrec.models.registry import build_model

    meta_file = Path(member.run) / "model" / "model.json"
    where = f"model.params.members[{i}].run"
    try:
        meta = json.loads(meta_file.read_text())
        name, config, run_items = meta["model"], meta["config"], meta["n_items"]
        saved_members = meta["extra"]["members"] if name == "mixture" else []
        if 0 <= member.member < len(saved_members):
            saved = saved_members[member.member]
            name, config = saved.get("model") or config["members"][member.member]["name"], saved["config"]
    except FileNotFoundError:
        raise ConfigError(f"{where}: {member.run} is not a trained run (no {meta_file})") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{where}: {meta_file}: damaged model record ({e})") from None
    if member.member >= len(saved_members):
        raise ConfigError(f"{where}: {member.run} holds a {name!r} model, which has no member {member.member}")
    if member.name and member.name != name:
        raise ConfigError(f"{where}: {member.run} holds a {name!r} model, not {member.name!r}")
    if run_items != n_items:
        raise ConfigError(f"{where}: {member.run} was trained on {run_items} items, this mixture has {n_items}")
    return build_model(name, config, n_items, where=f"{meta_file}: config")


def _load_run_member(member: MixtureMember, i: int, split: Split) -> Recommender:
    """The trained model of run directory ``member.run`` (or its mixture's member ``member.member``),
    checked to have been trained on ``split``."""
    from llmrec.data.splits import split_digest
    from llmrec.runs import load_run

    loaded = load_run(member.run)
    if split_digest(loaded.split) != split_digest(split):
        raise ValueError(f"members[{i}].run: {member.run} was trained on another dataset or split than this "
                         f"mixture's ({loaded.record['dataset']['path']})")
    model = loaded.model
    return model.members[member.member] if member.member >= 0 and isinstance(model, Mixture) else model


class Mixture(Recommender):
    """Weighted sum of normalised member scores (see the module docstring)."""

    name = "mixture"
    Config = MixtureConfig

    def __init__(self, config: MixtureConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        from dataclasses import fields

        from llmrec.models.registry import build_model, model_class

        self.members: list[Recommender] = []
        for i, m in enumerate(config.members):
            if m.run:
                self.members.append(_run_member(m, i, n_items))
                continue
            params = dict(m.params)
            if "seed" in {f.name for f in fields(model_class(m.name).Config)} and "seed" not in params:
                params["seed"] = config.seed
            self.members.append(build_model(m.name, params, n_items, where=f"model.params.members[{i}].params"))
        self.weights = [1.0] + [0.0] * (len(self.members) - 1)

    @property
    def wants_feedback(self) -> bool:
        return any(m.wants_feedback for m in self.members)

    def fit(self, split: Split, progress: bool = True, workdir: str | Path | None = None) -> dict[str, Any]:
        """Fit every member, then choose the weights on validation (``split.test`` is never read)."""
        fits: list[dict[str, Any]] = []
        for i, spec in enumerate(self.config.members):
            if spec.run:
                say(progress, f"mixture: member {i} ({self.members[i].name}) from {spec.run}")
                self.members[i] = _load_run_member(spec, i, split)
                self.members[i].feedback = self.feedback
                fits.append({"run": spec.run} if spec.member < 0 else {"run": spec.run, "member": spec.member})
                continue
            m = self.members[i]
            m.feedback = self.feedback
            say(progress, f"mixture: fitting member {i} ({m.name})")
            sub = None if workdir is None else Path(workdir) / f"member-{i}"
            fits.append(m.fit(split, progress=progress, workdir=sub))
        valid = split.valid
        rows = np.arange(len(valid))
        if self.config.valid_users and self.config.valid_users < len(rows):
            rows = np.sort(np.random.default_rng(self.config.seed).choice(rows, self.config.valid_users, replace=False))
        table: list[dict[str, float]] = []
        for j in range(1, len(self.members)):  # member j's weight, the earlier ones fixed
            results = self._valid_ndcg(split, rows, j)
            best = max(results, key=lambda w: (results[w], -w))  # the smallest weight among ties
            self.weights[j] = float(best)
            table.append({str(w): v for w, v in results.items()})
        best_ndcg = max(table[-1].values()) if table else self._valid_ndcg(split, rows, 0)[1.0]
        return {"members": [m.name for m in self.members], "member_fits": fits, "weights": self.weights,
                "valid_ndcg@10_by_weight": table, "best_valid_ndcg@10": best_ndcg, "valid_users": len(rows)}

    def _valid_ndcg(self, split: Split, rows: np.ndarray, j: int, batch: int = 512) -> dict[float, float]:
        """Validation NDCG@10 of members ``0..j`` mixed with the weights fixed so far and each weight of
        the grid for member ``j`` (``{1.0: ...}`` for ``j == 0``), scored in batches of users (memory
        bounded by ``batch x n_items``)."""
        valid = split.valid
        grid = self.config.weight_grid if j > 0 else [1.0]
        sums = dict.fromkeys(grid, 0.0)
        for start in range(0, len(rows), batch):
            idx = rows[start : start + batch]
            hists = [valid.histories[i] for i in idx]
            targets = [valid.targets[i] for i in idx]
            users = valid.users[idx]
            total = np.zeros((len(idx), self.n_items), dtype=np.float32)
            for i in range(j):
                if self.weights[i] > 0:
                    total += np.float32(self.weights[i]) * self._member_scores(self.members[i], hists, users)
            z = self._member_scores(self.members[j], hists, users)
            for w in grid:
                sums[w] += self._ndcg(total + np.float32(w) * z, hists, targets) * len(idx)
        return {w: v / max(1, len(rows)) for w, v in sums.items()}

    def _member_scores(self, m: Recommender, hists: Sequence[np.ndarray], users: np.ndarray | None) -> np.ndarray:
        return normalise_rows(m.score(hists, users), self.config.norm, self.config.rank_offset)

    @staticmethod
    def _ndcg(scores: np.ndarray, hists: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
        ranked, _ = top_k(scores, 10, hists)
        return mean_ndcg(ranked, targets)

    def score(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None) -> np.ndarray:
        """(n, n_items) float32: the weighted sum of the members' normalised scores."""
        out = np.zeros((len(histories), self.n_items), dtype=np.float32)
        for w, m in zip(self.weights, self.members, strict=True):
            if w > 0:
                m.feedback = self.feedback
                out += np.float32(w) * self._member_scores(m, histories, users)
        return out

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors: dict[str, np.ndarray] = {}
        extras = []
        for i, m in enumerate(self.members):
            t, e = m._state()
            tensors.update({f"m{i}.{k}": v for k, v in t.items()})
            extras.append({"model": m.name, "config": asdict(m.config), "extra": e})
        return tensors, {"weights": self.weights, "members": extras}

    def _load_state(self, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        from llmrec.config import from_dict

        if len(extra["members"]) != len(self.members):
            raise ValueError(f"saved mixture has {len(extra['members'])} members, its config {len(self.members)}")
        for i, (m, e) in enumerate(zip(self.members, extra["members"], strict=True)):
            if asdict(from_dict(type(m.config), e["config"])) != asdict(m.config):
                raise ValueError(f"member {i} ({m.name}) was saved with another config than the mixture's")
            prefix = f"m{i}."
            m._load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, e["extra"])
        self.weights = [float(w) for w in extra["weights"]]
