"""2-D lab: distil a Gaussian-mixture teacher with every method and measure what each keeps of the modes.

The mixture has a closed-form velocity at every t (an exact teacher) and exact samples of p_t, so the lab can
check a phased student's intermediate states against the truth. ``python -m pdmd lab --method all --json``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pdmd.core import distill
from pdmd.core import rectified_flow as rf
from pdmd.core.sampling import sample_phased
from pdmd.core.schedule import PhaseSchedule


@dataclass
class Mixture:
    """Isotropic Gaussian mixture: sum_i w_i N(mu_i, std^2 I) in 2-D."""

    means: Tensor
    weights: Tensor
    std: float = 0.1

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 2.5, std: float = 0.1) -> Mixture:
        angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(means.float(), torch.full((modes,), 1.0 / modes), std)

    @classmethod
    def grid(cls, side: int = 5, spacing: float = 1.0, std: float = 0.1) -> Mixture:
        axis = (torch.arange(side) - (side - 1) / 2) * spacing
        means = torch.cartesian_prod(axis, axis)
        return cls(means.float(), torch.full((side * side,), 1.0 / side**2), std)

    @property
    def num_modes(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[labels] + self.std * torch.randn(n, 2, generator=generator)

    def sample_pt(self, n: int, t: float, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of p_t: the forward process applied to data."""
        return rf.forward_process(self.sample(n, generator), torch.randn(n, 2, generator=generator), t)

    def velocity(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """Exact v(x_t, t) = E[eps - x_0 | x_t]. Per component, x_t ~ N((1-t) mu_i, var_t I) with
        var_t = (1-t)^2 std^2 + t^2, and E[eps - x_0 | x_t, i] = (t - (1-t) std^2) / var_t (x_t - (1-t) mu_i) - mu_i."""
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1)
        means = self.means.to(x.dtype)[None]                       # (1, M, 2)
        var_t = (1 - t) ** 2 * self.std**2 + t**2                   # (B, 1, 1)
        offset = x[:, None, :] - (1 - t) * means                    # (B, M, 2)
        logits = self.weights.to(x.dtype).log()[None] - (offset**2).sum(-1) / (2 * var_t[..., 0])
        resp = logits.softmax(dim=1)[..., None]                     # posterior of each component
        per_component = (t - (1 - t) * self.std**2) / var_t * offset - means
        return (resp * per_component).sum(1)


class VelocityMLP(nn.Module):
    """v(x, t) for 2-D points: sinusoidal features of t and of each coordinate of x, then a SiLU MLP.

    The x features matter: from raw (x, y) a 3-layer SiLU MLP only draws smooth fields, so the base fit, the
    students and the fake scores all smear the 5x5 grid's 25 sharp modes; sin/cos of x at octave frequencies
    let it place the grid's sharp basins (docs/benchmarks.md, 2-D lab levers). ``space_frequencies=0`` is raw x.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, time_features: int = 16, space_frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), time_features // 2)))
        # 1, 2, 4, ... rad per unit: the coarsest spans the data (|x| <~ 4), the finest resolves a mode (std 0.1)
        self.register_buffer("space_freqs", 2.0 ** torch.arange(space_frequencies, dtype=torch.float32))
        layers, width = [], 2 + 4 * space_frequencies + time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        time_angles = t.reshape(-1, 1) * self.freqs
        space_angles = (x[:, :, None] * self.space_freqs).flatten(1)  # (B, 2 * space_frequencies)
        features = [x, space_angles.sin(), space_angles.cos(), time_angles.sin(), time_angles.cos()]
        return self.net(torch.cat(features, dim=1))


@dataclass
class LabConfig:
    """The lab's budget and optimisers; every method trains with the same one (equal budgets)."""

    iters: int = 1000           # generator updates, split evenly over the phases: enough for a sharp phased
                                # student on the grid, and `--method all` there stays under 5 min on one thread
    batch: int = 512
    fake_ratio: int = 5         # fake-score updates per generator update (paper, DMD2)
    lr_generator: float = 5e-4
    beta1_generator: float = 0.9  # the generator's Adam beta1 (adversarial trainers often use 0)
    lr_fake: float = 1e-3
    renoise_shift: float = 1.0  # t ~ T(s, 1) shifted like the sampler's schedule (1 = uniform on (s, 1))
    gradient: str = "x0"        # DMD gradient form: DMD2 x0-normalised or velocity (w_{t|s})
    hidden: int = 128           # width of every MLP (base, students, fake scores: all start from the base)
    space_frequencies: int = 6  # x features of VelocityMLP; 0 = raw (x, y), which smears the grid
    teacher_iters: int = 6000   # base fit: the grid's modes are sharp in the base (the students' init) by then
    teacher_steps: int = 64     # the reference teacher sampler
    eval_samples: int = 4000


def train_flow_matching(mixture: Mixture, config: LabConfig, seed: int = 0) -> VelocityMLP:
    """The realistic teacher (and every student's initialisation): an MLP fitted by flow matching."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VelocityMLP(hidden=config.hidden, space_frequencies=config.space_frequencies)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.teacher_iters)
    for _ in range(config.teacher_iters):
        x0 = mixture.sample(1024, generator)
        eps = torch.randn(1024, 2, generator=generator)
        t = torch.rand(1024, generator=generator)
        loss = rf.flow_matching_loss(model(rf.forward_process(x0, eps, t), t), x0, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.requires_grad_(False)


def distill_students(method: distill.Method, teacher, base: nn.Module, config: LabConfig,
                     seed: int = 0) -> list[nn.Module]:
    """Phased DMD training loop (docs/method.md §2-§5): phases in order, earlier experts frozen, a fresh fake per phase."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    schedule = method.schedule
    experts = [copy.deepcopy(base).requires_grad_(True) for _ in range(schedule.num_phases)]
    iters_per_phase = max(1, config.iters // schedule.num_phases)
    for phase in range(schedule.num_phases):
        fake = copy.deepcopy(base).requires_grad_(True)  # docs/method.md §4: re-initialised from the teacher each phase
        opt_g = torch.optim.AdamW(experts[phase].parameters(), lr=config.lr_generator,
                                  betas=(config.beta1_generator, 0.999), weight_decay=0.0)
        opt_f = torch.optim.AdamW(fake.parameters(), lr=config.lr_fake, weight_decay=0.0)
        for _ in range(iters_per_phase):
            for _ in range(config.fake_ratio):
                with torch.no_grad():
                    x_s, s = distill.rollout(experts, phase, schedule, torch.randn(config.batch, 2, generator=generator),
                                             sgts=method.sgts, generator=generator)
                loss_f = distill.fake_loss(fake, x_s, s, shift=config.renoise_shift, generator=generator)
                opt_f.zero_grad()
                loss_f.backward()
                opt_f.step()
            x_s, s = distill.rollout(experts, phase, schedule, torch.randn(config.batch, 2, generator=generator),
                                     sgts=method.sgts, generator=generator)
            loss_g, _ = distill.generator_loss(x_s, s, teacher, fake, gradient=config.gradient,
                                              shift=config.renoise_shift, generator=generator)
            opt_g.zero_grad()
            loss_g.backward()
            nn.utils.clip_grad_norm_(experts[phase].parameters(), 1.0)
            opt_g.step()
        experts[phase].requires_grad_(False)
    return experts


# --- metrics ---------------------------------------------------------------------------------------------
REFERENCE_SAMPLES = 20_000  # data drawn for sliced W: large, so the reference adds little sampling noise
def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance between the projected samples.

    Sizes may differ: the larger set is read at the smaller set's quantile levels.
    """
    if len(a) > len(b):
        a, b = b, a
    directions = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = (a @ directions).sort(0)
    pb, _ = (b @ directions).sort(0)
    levels = ((torch.arange(len(a)) + 0.5) * len(b) / len(a)).long()
    return float((pa - pb[levels]).abs().mean())


def _mode_stats(x: Tensor, mixture: Mixture):
    distance = torch.cdist(x, mixture.means)
    nearest_distance, label = distance.min(1)
    in_mode = nearest_distance < 3 * mixture.std
    counts = torch.bincount(label, minlength=mixture.num_modes).float()
    spread = (nearest_distance[in_mode] ** 2).mean().sqrt() if in_mode.any() else torch.tensor(0.0)
    return label, in_mode, counts, float(spread)


def mode_metrics(x: Tensor, mixture: Mixture, reference_spread: float) -> dict:
    """In-modes (the fraction of samples within 3 std of a mode: the data's is 0.99, a uniform smear over the
    5x5 grid's square ~0.28), modes covered (at least half their fair share within 3 std), KL(mode histogram ||
    weights), spread ratio (RMS distance to the mode within 3 std, relative to the data's own) and sliced W to
    fresh data."""
    label, in_mode, _, spread = _mode_stats(x, mixture)
    covered_counts = torch.bincount(label[in_mode], minlength=mixture.num_modes).float()
    covered = int((covered_counts >= 0.5 * len(x) * mixture.weights).sum())
    histogram = torch.bincount(label, minlength=mixture.num_modes).float() / len(x)
    nonzero = histogram > 0
    kl = float((histogram[nonzero] * (histogram[nonzero] / mixture.weights[nonzero]).log()).sum())
    data = mixture.sample(REFERENCE_SAMPLES, torch.Generator().manual_seed(12345))
    return {"in_modes": round(float(in_mode.float().mean()), 4),
            "modes_total": mixture.num_modes, "modes_covered": covered, "mode_kl": round(kl, 4),
            "spread_ratio": round(spread / reference_spread, 4), "sliced_w": round(sliced_wasserstein(x, data), 4)}


# --- the experiment ----------------------------------------------------------------------------------------
METHOD_CHOICES = ("teacher", *distill.METHODS)


def run_lab(methods: list[str], mixture: Mixture, teacher_kind: str = "exact", seed: int = 0,
            config: LabConfig | None = None, progress=None) -> tuple[list[dict], dict[str, Tensor]]:
    """Run each method; returns its metrics and its samples (for plotting), plus the data under 'data'.

    ``progress(done, total, name)`` is called before each method (a UI's progress bar)."""
    config = config or LabConfig()
    torch.manual_seed(seed)
    start = time.perf_counter()
    base = train_flow_matching(mixture, config, seed)
    base_seconds = time.perf_counter() - start
    teacher = mixture.velocity if teacher_kind == "exact" else base
    data = mixture.sample(config.eval_samples, torch.Generator().manual_seed(seed + 1))
    reference_spread = _mode_stats(data, mixture)[3]
    noise = torch.randn(config.eval_samples, 2, generator=torch.Generator().manual_seed(seed + 2))
    results, samples = [], {"data": data}
    for done, name in enumerate(methods):
        if progress is not None:
            progress(done, len(methods), name)
        start = time.perf_counter()
        if name == "teacher":
            schedule = PhaseSchedule.uniform(config.teacher_steps)
            with torch.no_grad():
                out = sample_phased(teacher, noise, schedule)
            seconds = time.perf_counter() - start + (0.0 if teacher_kind == "exact" else base_seconds)
        else:
            method = distill.METHODS[name]
            schedule = method.schedule
            experts = distill_students(method, teacher, base, config, seed)
            with torch.no_grad():
                out = sample_phased(experts, noise, schedule)
            seconds = time.perf_counter() - start
        if not torch.isfinite(out.sample).all():
            raise RuntimeError(f"method {name!r} diverged (non-finite samples); lower the learning rate")
        row = {"method": name, **mode_metrics(out.sample, mixture, reference_spread),
               "seconds": round(seconds, 2), "nfe": out.nfe}
        if out.boundary_states:
            row["boundary_sliced_w"] = [
                {"t": round(t, 4), "sliced_w": round(sliced_wasserstein(
                    x, mixture.sample_pt(len(x), t, torch.Generator().manual_seed(seed + 3))), 4)}
                for t, x in out.boundary_states]
        results.append(row)
        samples[name] = out.sample
    return results, samples


def run_lab_seeds(methods: list[str], mixture: Mixture, teacher_kind: str, seeds: list[int],
                  config: LabConfig | None = None, progress=None) -> tuple[list[list[dict]], dict[str, Tensor]]:
    """``run_lab`` once per seed: every seed's rows, and the first seed's samples (what a plot shows).

    ``progress(done, total, name)`` counts methods over all seeds."""
    runs, first_samples = [], {}
    for index, seed in enumerate(seeds):
        step = None if progress is None else (
            lambda done, total, name, index=index, seed=seed: progress(index * total + done, len(seeds) * total,
                                                                       f"{name}, seed {seed}"))
        rows, samples = run_lab(methods, mixture, teacher_kind, seed, config, step)
        runs.append(rows)
        if index == 0:
            first_samples = samples
    return runs, first_samples


# --- several seeds: mean and std of every metric ------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(variance)}


def summarize(runs: list[list[dict]]) -> list[dict]:
    """Per method (in the first run's order), the mean and std over runs of every numeric metric, as
    ``{"mean": m, "std": s}``; ``boundary_sliced_w`` is summarised per boundary time. ``runs`` holds one
    ``run_lab`` result per seed, each with the same methods."""
    summary = []
    for position, first in enumerate(runs[0]):
        rows = [run[position] for run in runs]
        if any(row["method"] != first["method"] for row in rows):
            raise ValueError(f"the runs list their methods in different orders at position {position}")
        entry = {"method": first["method"], "runs": len(rows)}
        for key, value in first.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key] = mean_std([row[key] for row in rows])
        if "boundary_sliced_w" in first:
            entry["boundary_sliced_w"] = [
                {"t": boundary["t"], "sliced_w": mean_std([row["boundary_sliced_w"][i]["sliced_w"] for row in rows])}
                for i, boundary in enumerate(first["boundary_sliced_w"])]
        summary.append(entry)
    return summary


def cell_text(mean: float, std: float, digits: int = 2) -> str:
    """'0.93 ± 0.02': a mean and its std at a fixed number of decimals."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


ROW_COLUMNS = ("method", "nfe", "in_modes", "modes_covered", "modes_total", "mode_kl", "spread_ratio", "sliced_w",
               "seconds")  # one seed's table, in the CLI and the Lab tab
SUMMARY_COLUMNS = (  # (metric, header, decimals)
    ("in_modes", "in modes", 3), ("modes_covered", "modes covered", 1), ("mode_kl", "mode KL", 3),
    ("spread_ratio", "spread ratio", 2), ("sliced_w", "sliced W", 3), ("seconds", "seconds", 0))


def summary_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and text rows (mean ± std) of a ``summarize`` result, the sliced W at each boundary last."""
    headers = ["method", "NFE", *(header for _, header, _ in SUMMARY_COLUMNS), "sliced W of x_{t_1} to p_{t_1}"]
    rows = []
    for entry in summary:
        boundary = "; ".join(f"{cell_text(b['sliced_w']['mean'], b['sliced_w']['std'], 3)} (t = {b['t']})"
                             for b in entry.get("boundary_sliced_w", [])) or "–"
        cells = [cell_text(entry[key]["mean"], entry[key]["std"], digits) for key, _, digits in SUMMARY_COLUMNS]
        rows.append([entry["method"], f"{entry['nfe']['mean']:g}", *cells, boundary])
    return headers, rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(samples: dict[str, Tensor], results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["method"]: row for row in results}
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.9), squeeze=False)
    limit = float(samples["data"].abs().max()) * 1.25
    for ax, name in zip(axes[0], names):
        points = samples[name][:3000]
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.4, color="black" if name == "data" else "tab:blue")
        row = by_name.get(name)
        title = name if row is None else (f"{name} (NFE {row['nfe']})\nmodes {row['modes_covered']}/"
                                          f"{row['modes_total']}  in modes {row['in_modes']:.2f}\n"
                                          f"KL {row['mode_kl']:.3f}  spread {row['spread_ratio']:.2f}  "
                                          f"SW {row['sliced_w']:.3f}")
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
