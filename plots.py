"""Pictures of a run: 2D scatter plots of samples over the data, image grids, and MCM's trajectories. Needs the
`plot` extra (matplotlib); importing this module without it raises ImportError, which train.py reports and carries
on. Every picture names what it shows in its own title and legend, so it can be read without the code."""
import math
import textwrap

import matplotlib
import torch
import torch.nn.functional as F

from algorithms import addim, edm
from data import toy

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DATA, SAMPLES, PATHS, TEACHER = "0.72", "tab:blue", "tab:red", "0.6"


def _title(fig, title):
    """The figure's title, wrapped to the figure's width so that no part of it is cut off."""
    fig.suptitle(textwrap.fill(title, max(20, int(fig.get_figwidth() * 13))), fontsize=10)


def _frame(x_data):
    """Half-width of a square frame around the data: 1.2 × its largest coordinate, rounded up to a half."""
    return math.ceil(2.4 * float(x_data[:, :2].abs().max())) / 2


def scatter(path, x_data, panels, title="", paths=None, lim=None, n_paths=8):
    """One panel per entry of `panels` (name -> [N, 2] samples), each over the data in grey, on a common square
    frame with ticks. `paths`, if given, maps a panel name to the list of [N, 2] states along each sample's path;
    those of the first `n_paths` samples are drawn as lines from the sampler's first output on (the start, pure
    noise at σ_max, lies far outside the frame), clipped at the frame. Each panel counts its samples outside the
    frame, which a scatter plot would otherwise hide."""
    lim = lim or _frame(x_data)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels) + 0.4, 3.9), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    drew_paths = False
    for ax, (name, x) in zip(axes[0], panels.items()):
        x = x[:, :2].detach().float().cpu()
        ax.scatter(*x_data[:, :2].float().cpu().T, s=2, c=DATA, linewidths=0)
        if paths and len(paths.get(name, [])) > 2:  # a trajectory with more than the one jump from noise
            traj = torch.stack([s[:n_paths, :2].detach().float().cpu() for s in paths[name][1:]])  # [steps, n, 2]
            ax.plot(traj[:, :, 0], traj[:, :, 1], "-o", ms=2.5, lw=0.9, c=PATHS, alpha=0.8)
            drew_paths = True
        ax.scatter(*x.T, s=2, c=SAMPLES, linewidths=0)
        outside = int((x.abs() > lim).any(dim=1).sum())
        ax.text(0.03, 0.03, f"{outside} of {len(x)} outside the frame", transform=ax.transAxes, fontsize=7,
                color="0.3", va="bottom")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=name, aspect="equal")
        ax.tick_params(labelsize=7)
    handles = [Line2D([], [], ls="", marker="o", ms=4, c=DATA, label="data"),
               Line2D([], [], ls="", marker="o", ms=4, c=SAMPLES, label="samples")]
    if drew_paths:
        handles.append(Line2D([], [], marker="o", ms=3, lw=0.8, c=PATHS,
                              label=f"paths of {n_paths} samples after the first jump"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    _title(fig, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(x, n=64, gutter=2):
    """Up to n images [N, C, H, W] in [-1, 1] as one [rows·(H+g) − g, cols·(W+g) − g, C] array in [0, 1], with
    white gutters of g pixels between the images."""
    k = max(1, int(min(n, len(x)) ** 0.5))
    x = ((x[:k * k].detach().float().cpu().clamp(-1, 1) + 1) / 2)
    x = F.pad(x, (0, gutter, 0, gutter), value=1.0)                            # [k², C, H+g, W+g]
    grid = x.reshape(k, k, *x.shape[1:]).permute(0, 3, 1, 4, 2)                # [k, H+g, k, W+g, C]
    grid = grid.reshape(k * x.shape[2], k * x.shape[3], x.shape[1])
    return grid[:-gutter, :-gutter] if gutter else grid


def image_grids(path, panels, title="", n=64, x_data=None):
    """One grid of up to n images per entry of `panels` (name -> [N, C, H, W] in [-1, 1]), after a grid of the
    data if `x_data` is given."""
    panels = {**({} if x_data is None else {"data": x_data}), **panels}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(2.9 * len(panels), 4.0), 3.5), squeeze=False,
                             layout="constrained")
    for ax, (name, x) in zip(axes[0], panels.items()):
        grid = image_grid(x, n)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set(title=name, xticks=[], yticks=[])
    _title(fig, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectories(path, t_teacher, x_teacher, students, sigma_of_t, n=24, title=""):
    """Heek et al. Fig. 1 for 2D data: the first coordinate of the VP state z_t = x_t/sqrt(1 + σ(t)²) against VP
    time t, for n sample paths. The teacher's ODE paths (`x_teacher`: [T, N, 2] at times `t_teacher`) are drawn in
    grey in every panel, the students' few-step paths (name -> (times [S+1], states [S+1, N, 2])) in colour."""
    vp = lambda t, x: (x[..., 0] / (1 + sigma_of_t(t) ** 2).sqrt()[:, None]).cpu()  # [T, N]
    fig, axes = plt.subplots(1, len(students), figsize=(3.2 * len(students) + 0.4, 3.6), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (name, (t, x)) in zip(axes[0], students.items()):
        ax.plot(t_teacher.cpu(), vp(t_teacher, x_teacher)[:, :n], c=TEACHER, lw=0.8)
        ax.plot(t.cpu(), vp(t, x)[:, :n], "-o", c=PATHS, ms=3, lw=1.0)
        ax.set(title=f"{name} ({len(t) - 1} NFE)", xlabel="t (VP time)", xlim=(1.02, -0.02))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("first coordinate of z_t")
    handles = [Line2D([], [], c=TEACHER, lw=0.8, label="teacher ODE"),
               Line2D([], [], c=PATHS, marker="o", ms=3, lw=1.0, label="student")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    _title(fig, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mcm_paths(path, denoiser, students, num=64):
    """Heek et al. Fig. 1: each student's S-step path (name -> states [S+1, N, 2], at VP times k/S) against the exact
    teacher ODE from the same start x_T, integrated through `num` VP-time steps of MCM's schedule (addim.sigma_of_t)."""
    t_dense = torch.linspace(1, 0, num + 1, dtype=torch.float64)
    sigma_dense = addim.sigma_of_t(t_dense).clamp(min=edm.SIGMA_MIN)  # the exact ODE stops at σ_min, not at 0
    states = [next(iter(students.values()))[0]]  # the students' common start x_T = σ_max·noise
    for sigma_cur, sigma_next in zip(sigma_dense[:-1], sigma_dense[1:]):
        states.append(toy.ode_solve(denoiser, states[-1], sigma_cur, sigma_next))
    timed = {k: (torch.linspace(1, 0, len(x), dtype=torch.float64), x) for k, x in students.items()}
    return trajectories(path, t_dense, torch.stack(states), timed, addim.sigma_of_t,
                        title="MCM: S-step student paths against the teacher's ODE from the same noise")


def samples(path, panels, title="", x_data=None, paths=None):
    """Scatter plots over the data for 2D samples ([N, 2]), image grids (after a grid of the data) for images
    ([N, C, H, W])."""
    first = next(iter(panels.values()))
    if first.ndim == 2:
        if x_data is None:
            raise ValueError("plots.samples: 2D samples are drawn over the data, so x_data is required")
        return scatter(path, x_data, panels, title, paths)
    return image_grids(path, panels, title, x_data=x_data)
