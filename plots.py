"""Pictures of a run: 2D scatter plots of samples over the data, and trajectories. Needs the `plot` extra
(matplotlib); importing this module without it raises ImportError, which train.py reports and carries on."""
import matplotlib
import torch

from algorithms import addim, edm
from data import toy

matplotlib.use("Agg")  # no screen needed
import matplotlib.pyplot as plt  # noqa: E402


def scatter(path, x_data, panels, title="", paths=None, lim=2.0):
    """One panel per entry of `panels` (name -> [N, 2] samples), each over the data in grey. `paths`, if given,
    maps a panel name to a list of [N, 2] states along a trajectory, of which the first 24 are drawn as lines."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        ax.scatter(*x_data[:, :2].cpu().T, s=2, c="0.75", label="data")
        ax.scatter(*x[:, :2].cpu().T, s=2, c="tab:blue", label="samples")
        if paths and paths.get(name):  # a trajectory was recorded for this panel
            traj = torch.stack([s[:24, :2].cpu() for s in paths[name]])  # [steps, 24, 2]
            traj = traj.clamp(-lim * 1.5, lim * 1.5)
            ax.plot(traj[:, :, 0], traj[:, :, 1], "-o", ms=2, lw=0.8, c="tab:red", alpha=0.7)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=name, aspect="equal", xticks=[], yticks=[])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grids(path, panels, title="", n=64):
    """One grid of up to n images per entry of `panels` (name -> [N, C, H, W] in [-1, 1])."""
    import einops

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        k = int(min(n, len(x)) ** 0.5)
        grid = einops.rearrange(x[:k * k].float().cpu().clamp(-1, 1), "(r c) C H W -> (r H) (c W) C", r=k)
        grid = (grid + 1) / 2
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set(title=name, xticks=[], yticks=[])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectories(path, t_teacher, x_teacher, students, sigma_of_t, n=24, title=""):
    """Heek et al. Fig. 1 for 2D data: the first coordinate of the VP state z_t = x_t/sqrt(1 + σ(t)²) against VP
    time t, for n sample paths. The teacher's ODE paths (`x_teacher`: [T, N, 2] at times `t_teacher`) are drawn in
    grey in every panel, the students' few-step paths (name -> (times [S+1], states [S+1, N, 2])) in colour."""
    vp = lambda t, x: (x[..., 0] / (1 + sigma_of_t(t) ** 2).sqrt()[:, None]).cpu()  # [T, N]
    fig, axes = plt.subplots(1, len(students), figsize=(3.4 * len(students), 3.2), squeeze=False, sharey=True)
    for ax, (name, (t, x)) in zip(axes[0], students.items()):
        ax.plot(t_teacher.cpu(), vp(t_teacher, x_teacher)[:, :n], c="0.7", lw=0.8)
        ax.plot(t.cpu(), vp(t, x)[:, :n], "-o", c="tab:red", ms=3, lw=1.0)
        ax.set(title=name, xlabel="t (VP time)", xlim=(1.02, -0.02))
    axes[0][0].set_ylabel("first coordinate of z_t")
    fig.suptitle(title)
    fig.tight_layout()
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
                        title="MCM paths (red) and the teacher's ODE paths (grey)")


def samples(path, panels, title="", x_data=None, paths=None):
    """Scatter plots over the data for 2D samples ([N, 2]), image grids for images ([N, C, H, W])."""
    if next(iter(panels.values())).ndim == 2:
        return scatter(path, x_data, panels, title, paths)
    return image_grids(path, panels, title)
