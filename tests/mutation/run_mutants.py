"""Hand-made mutation check of the maths tests: python tests/mutation/run_mutants.py [-k SUBSTRING] [--list].

Each mutant is one plausible slip in algorithms/, data/toy.py, networks/checkpoint.py or the EMA update: a flipped
sign, a dropped square root, swapped σ's, an off-by-one, a widened allowlist. The script copies the checkout to a
temporary directory (it never edits the checkout), applies one mutant at a time there, runs `pytest -m maths -x`
and counts the mutant killed if any test fails. Mutants marked `equivalent` compute the same function as the
original (the reason is given) and are not counted. It prints every survivor and the score.

Not collected by pytest (no test_ prefix). Takes about 15-30 s per mutant on one core."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

E, C, T, M, A, P = ("algorithms/edm.py", "algorithms/cd.py", "algorithms/ctm.py", "algorithms/mcm.py",
                    "algorithms/addim.py", "algorithms/analytic_precond.py")
TOY, CK = "data/toy.py", "networks/checkpoint.py"

# (file, original text, mutated text[, "equivalent: reason"])
MUTANTS = [
    # ---- EDM: grid, preconditioning, loss, steps, sampler, EMA
    (E, "i / (N - 1) * (sigma_min", "i / N * (sigma_min"),
    (E, "sigma_max ** (1 / rho) + i", "sigma_min ** (1 / rho) + i"),
    (E, "c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)", "c_skip = sigma_data / (sigma**2 + sigma_data**2)"),
    (E, "c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()",
        "c_out = sigma * sigma_data / (sigma**2 + sigma_data**2)"),
    (E, "c_in = 1 / (sigma_data**2 + sigma**2).sqrt()", "c_in = 1 / (sigma_data**2 + sigma**2)"),
    (E, "c_noise = sigma.log() / 4", "c_noise = sigma.log() / 2"),
    (E, "c_noise = sigma.log() / 4", "c_noise = sigma / 4"),
    (E, "return c_skip * x + c_out * F_x.to(x.dtype)", "return c_skip * x - c_out * F_x.to(x.dtype)"),
    (E, "F_x = net(c_in * x, c_noise.flatten(), labels)", "F_x = net(c_in * x, c_noise.flatten(), None)"),
    (E, "sigma = (rnd * cfg.P_std + cfg.P_mean).exp()", "sigma = (rnd * cfg.P_mean + cfg.P_std).exp()"),
    (E, "sigma = (rnd * cfg.P_std + cfg.P_mean).exp()", "sigma = (rnd * cfg.P_std - cfg.P_mean).exp()"),
    (E, "weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2",
        "weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data)"),
    (E, "weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2", "weight = 1 / sigma**2"),
    (E, "D_yn = denoise(net, x + n, sigma, labels, cfg.sigma_data)", "D_yn = denoise(net, x + n, sigma, labels)"),
    (E, "return weight * (D_yn - x).square().flatten(1).sum(1)",
         "return weight * (D_yn - x).square().flatten(1).mean(1)"),
    (E, "return x + (t_next - t_cur) * d_cur                                    # Alg. 1 l. 5",
        "return x + (t_cur - t_next) * d_cur                                    # Alg. 1 l. 5"),
    (E, "d_prime = (x_next - D(x_next, t_next.flatten(), labels)) / t_next",
        "d_prime = (x_next - D(x_next, t_cur.flatten(), labels)) / t_next"),
    (E, "return x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)", "return x + (t_next - t_cur) * d_prime"),
    (E, "return x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)",
         "return x_next + (t_next - t_cur) * 0.5 * d_prime"),
    (E, "halflife = min(halflife, rampup * seen)", "halflife = max(halflife, rampup * seen)"),
    (E, "return 0.5 ** (batch / max(halflife, 1e-8))", "return 0.5 ** (halflife / max(batch, 1e-8))"),
    (E, "torch._foreach_lerp_(targets, sources, 1.0 - rate)", "torch._foreach_lerp_(targets, sources, rate)"),
    (E, "torch._foreach_lerp_(targets, sources, 1.0 - rate)", "torch._foreach_lerp_(sources, targets, 1.0 - rate)"),
    (E, "if len(targets) != len(sources):", "if False:"),
    (E, "x = noise.to(torch.float64) * t_steps[0]", "x = noise.to(torch.float64) * t_steps[1]"),
    (E, "return euler_step(D64, x, t_steps[-1], 0.0, labels).to(noise.dtype)", "return x.to(noise.dtype)"),
    (E, "for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):",
         "for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):"),
    (E, "return (a - b).square().flatten(1).mean(1)", "return (a - b).square().flatten(1).sum(1)"),
    (E, "return (a - b).flatten(1).norm(dim=1)", "return (a - b).flatten(1).norm(dim=1) ** 2"),
    (E, "c = 0.00054 * a[0].numel() ** 0.5 if c is None else c", "c = 0.00054 * a[0].numel() if c is None else c"),
    (E, "return ((a - b).flatten(1).square().sum(1) + c**2).sqrt() - c",
         "return ((a - b).flatten(1).square().sum(1) + c**2).sqrt()"),
    # ---- CD
    (C, "c_skip = cfg.sigma_data**2 / ((t - cfg.sigma_min) ** 2 + cfg.sigma_data**2)",
        "c_skip = cfg.sigma_data**2 / (t ** 2 + cfg.sigma_data**2)"),
    (C, "c_out = cfg.sigma_data * (t - cfg.sigma_min) / (cfg.sigma_data**2 + t**2).sqrt()",
        "c_out = cfg.sigma_data * (t - cfg.sigma_min) / (cfg.sigma_data**2 + t**2)"),
    (C, "c_out = cfg.sigma_data * (t - cfg.sigma_min) / (cfg.sigma_data**2 + t**2).sqrt()",
        "c_out = cfg.sigma_data * t / (cfg.sigma_data**2 + t**2).sqrt()"),
    (C, "c_skip, c_out = outer(t, torch.full_like(t, cfg.sigma_min))", "c_skip, c_out = outer(t, t)"),
    (C, "idx = torch.randint(0, cfg.N - 1,", "idx = torch.randint(0, cfg.N - 2,"),
    (C, "t_n1, t_n = t_grid[idx], t_grid[idx + 1]", "t_n, t_n1 = t_grid[idx], t_grid[idx + 1]"),
    (C, "x_t_n1 = x + edm.bcast(t_n1, x) * z", "x_t_n1 = x + edm.bcast(t_n, x) * z"),
    (C, "x_hat = edm.heun_step(teacher, x_t_n1, t_n1, t_n, labels)",
         "x_hat = edm.euler_step(teacher, x_t_n1, t_n1, t_n, labels)"),
    (C, "target = f(cfg, net_ema, x_hat, t_n, labels, outer)", "target = f(cfg, net, x_hat, t_n, labels, outer)"),
    (C, "target = f(cfg, net_ema, x_hat, t_n, labels, outer)", "target = f(cfg, net_ema, x_hat, t_n1, labels, outer)"),
    (C, "pred = f(cfg, net, x_t_n1, t_n1, labels, outer)", "pred = f(cfg, net_ema, x_t_n1, t_n1, labels, outer)"),
    (C, "return edm.sigma_grid(nfe + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1:-1].tolist()",
        "return edm.sigma_grid(nfe, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1:].tolist()"),
    (C, "x_hat = x + (tau**2 - cfg.sigma_min**2) ** 0.5 * z", "x_hat = x + tau * z"),
    (C, "x_hat = x + (tau**2 - cfg.sigma_min**2) ** 0.5 * z", "x_hat = x + (tau**2 - cfg.sigma_min**2) * z"),
    (C, "x_hat = noise * cfg.sigma_max ", "x_hat = noise "),
    # ---- CTM
    (T, "return r + (1 - r) * c_skip, (1 - r) * c_out", "return r + (1 - r) * c_skip, (1 + r) * c_out"),
    (T, "return r + (1 - r) * c_skip, (1 - r) * c_out", "return r + c_skip, (1 - r) * c_out"),
    (T, "r = s / t", "r = t / s"),
    (T, "noise_labels_s=(s.log() / 4).to(x.dtype)", "noise_labels_s=(t.log() / 4).to(x.dtype)"),
    (T, "c_skip, c_out, _, _ = edm.precond(per_example(t, x), sigma_data)",
        "c_skip, c_out, _, _ = edm.precond(per_example(s, x), sigma_data)"),
    (T, "k = int(torch.multinomial(w / w.sum(), 1, generator=generator)) + 1",
        "k = int(torch.multinomial(w / w.sum(), 1, generator=generator))"),
    (T, "w = torch.arange(1, K_max + 1, dtype=torch.float64, device=device)",
        "w = torch.ones(K_max, dtype=torch.float64, device=device)"),
    (T, "n = torch.randint(0, N - k, (B,)", "n = torch.randint(0, N - k - 1, (B,)"),
    (T, "m = n + k + (r * (N - n - k)).floor().long()", "m = n + k + (r * (N - n - k - 1)).floor().long()"),
    (T, "m = n + k + (r * (N - n - k)).floor().long()", "m = n + k + 1 + (r * (N - n - k - 1)).floor().long()"),
    (T, "for j in range(k):", "for j in range(k - 1):"),
    (T, "x = edm.heun_step(teacher, x, grid[n + j], grid[n + j + 1], labels)",
        "x = edm.euler_step(teacher, x, grid[n + j], grid[n + j + 1], labels)"),
    (T, "y_target = jump(net, x_u, u, s)", "y_target = jump(net, x_u, t, s)"),
    (T, "y_target = jump(net, x_u, u, s)", "y_target = jump(net_ema, x_u, u, s)"),
    (T, "x_target = jump(net_ema, y_target, s, cfg.sigma_min)", "x_target = y_target"),
    (T, "y_est = jump(net, x_t, t, s)", "y_est = jump(net, x_t, u, s)"),
    (T, "x_est = jump(frozen(net_ema), y_est, s, cfg.sigma_min)", "x_est = jump(frozen(net), y_est, s, cfg.sigma_min)"),
    (T, "r = cfg.diffusion_mult * torch.rand(B - h,", "r = torch.rand(B - h,"),
    (T, "return torch.cat([(cfg.P_mean + cfg.P_std * z).exp(), (a + r * (b - a)) ** cfg.rho])",
        "return torch.cat([(cfg.P_std + cfg.P_mean * z).exp(), (a + r * (b - a)) ** cfg.rho])"),
    (T, "w = ((sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2).to(x.dtype)",
        "w = ((sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data)).to(x.dtype)"),
    (T, "D_x = g(net, x + bcast(sigma, x) * z, sigma, sigma, labels, cfg.sigma_data)",
        "D_x = g(net, x + bcast(sigma, x) * z, sigma, cfg.sigma_min, labels, cfg.sigma_data)"),
    (T, "return (grad_ctm.norm() / (grad_dsm.norm() + 1e-4 * grad_scale)).clamp(0, 1e4).detach()",
        "return (grad_dsm.norm() / (grad_ctm.norm() + 1e-4 * grad_scale)).clamp(0, 1e4).detach()"),
    (T, "return (grad_ctm.norm() / (grad_dsm.norm() + 1e-4 * grad_scale)).clamp(0, 1e4).detach()",
        "return (grad_ctm.norm() / (grad_dsm.norm() + 1e-4 * grad_scale)).clamp(0, 1e4)",
        "equivalent: autograd.grad without create_graph returns gradients outside the graph, so λ is a constant "
        "with or without detach"),
    (T, "return L_ctm + lambda_dsm * L_dsm", "return lambda_dsm * L_ctm + L_dsm"),
    (T, "t_tilde = math.sqrt(1 - cfg.gamma**2) * (t_steps[n + 1] - cfg.sigma_min) + cfg.sigma_min",
        "t_tilde = (1 - cfg.gamma**2) * (t_steps[n + 1] - cfg.sigma_min) + cfg.sigma_min"),
    (T, "std = math.sqrt((1 - math.sqrt(1 - cfg.gamma**2)) * (t_steps[n + 1] - cfg.sigma_min)",
        "std = math.sqrt((1 - math.sqrt(1 - cfg.gamma**2)) * (t_steps[n + 1] + cfg.sigma_min)"),
    (T, "if n < nfe - 1:", "if n < nfe:",
        "equivalent: after the last jump t_{n+1} = σ_min, so the renoising std has the factor t_{n+1} − σ_min = 0 "
        "and adds exactly 0·z"),
    # ---- MCM
    (M, "frac = min(max(i / cfg.anneal_iters, 0.0), 1.0)", "frac = max(i / cfg.anneal_iters, 0.0)"),
    (M, "step = torch.randint(0, cfg.S, (B,)", "step = torch.randint(0, cfg.S - 1, (B,)"),
    (M, "n_rel = torch.randint(1, N_seg + 1,", "n_rel = torch.randint(0, N_seg,"),
    (M, "s = (step * N_seg + n_rel - 1).to(torch.float64) / T", "s = (step * N_seg).to(torch.float64) / T"),
    (M, "anchor = bcast(s == t_step, x_s).bool()", "anchor = bcast(s < 0, x_s).bool()"),
    (M, "x_target = addim.inverse_ddim(x_ref, x_t, sigma_t, sigma_step)", "x_target = x_ref"),
    (M, "addim.ddim(x_hat_ref, x_s, sigma_s, sigma_step))", "addim.ddim(x_hat_ref, x_s, sigma_s, sigma_s))"),
    (M, "w = 1 / sigma_t**2 + 1 ", "w = 1 / sigma_t + 1 "),
    (M, "x_var = addim.x_var_empirical(x, x_teacher, cfg.eta) if cfg.addim_teacher else 0.0",
        "x_var = 0.0"),
    (M, "x_var = addim.x_var_empirical(x, x_teacher, cfg.eta) if cfg.addim_teacher else 0.0",
        "x_var = addim.x_var_empirical(x, x_teacher, 1.0) if cfg.addim_teacher else 0.0"),
    (M, "x_s = addim.ddim(x, x_t, sigma_t, sigma_s)", "x_s = addim.ddim(x, x_t, sigma_t, 0 * sigma_s)"),
    (M, "x = addim.ddim(x_hat, x, sigmas[k], sigmas[k + 1])", "x = x_hat"),
    # ---- aDDIM
    (A, "return torch.tan(t * math.atan(sigma_max))", "return torch.tan(t * math.pi / 2) * sigma_max"),
    (A, "return (x_hat64 + r * (x_t.to(torch.float64) - x_hat64)).to(x_t.dtype)",
        "return (x_hat64 + r * (x_t.to(torch.float64) + x_hat64)).to(x_t.dtype)"),
    (A, "/ (1 - r)).to(x_t.dtype)", "/ (1 + r)).to(x_t.dtype)"),
    (A, "z_var = (1 - sigma_s / sigma_t) ** 2 * bcast(x_var, x64)",
         "z_var = (1 - sigma_s / sigma_t) * bcast(x_var, x64)"),
    (A, "(sigma_s**2 + d / eps_norm2 * z_var).sqrt()", "(sigma_s**2 + z_var).sqrt()"),
    (A, "return eta * (x.to(torch.float64) - x_hat.to(torch.float64)).flatten(1).square().mean(1)",
        "return eta * (x.to(torch.float64) - x_hat.to(torch.float64)).flatten(1).square().sum(1)"),
    (A, "return 0.1 / (2 + 1 / sigma**2)", "return 0.1 / (2 + sigma**2)"),
    (A, "x_var = x_var_analytic(sigmas[:-1]) if x_var is None", "x_var = x_var_analytic(sigmas[1:]) if x_var is None"),
    (A, "x = addim(x_hat, x, sigmas[i], sigmas[i + 1], x_var[i])",
         "x = addim(x_hat, x, sigmas[i], sigmas[i + 1], 0.0)"),
    # ---- Analytic-Precond (a few)
    (P, "f=(a_t.Lam - a_s.Lam).exp()", "f=(a_s.Lam - a_t.Lam).exp()"),
    (P, "return f + g * (c_skip - ell_t), g * c_out", "return f + g * c_skip, g * c_out"),
    (P, "g_fwd=g_bwd * (a_s.K - a_t.K).exp()", "g_fwd=g_bwd * (a_t.K - a_s.K).exp()"),
    (P, "den = 1 + J.g_bwd * J.ell_s", "den = 1 + J.g_bwd * J.ell_t"),
    (P, "return (J.f + J.g_bwd * c_skip) / den, J.g_bwd * c_out / den",
         "return (J.f + J.g_bwd * c_skip) / den, J.g_bwd * c_out"),
    # ---- toy
    (TOY, "var = column(sigma, x64) ** 2 + self.std**2", "var = column(sigma, x64) ** 2"),
    (TOY, "return (-d2 if self.std == 0 else self.log_w.to(x.device) - d2 / (2 * self.std**2)).argmax(1)",
          "return (-d2 if self.std == 0 else -d2 / (2 * self.std**2)).argmax(1)"),
    (TOY, "logits = log_w + (x64 @ means.T - 0.5 * means.square().sum(1)) / var",
        "logits = log_w + (x64 @ means.T - means.square().sum(1)) / var"),
    (TOY, "logits = log_w + (x64 @ means.T - 0.5 * means.square().sum(1)) / var",
        "logits = (x64 @ means.T - 0.5 * means.square().sum(1)) / var"),
    (TOY, "shrink = self.std**2 / var", "shrink = self.std / var"),
    (TOY, "return ((1 - shrink) * (p @ means) + shrink * x64).to(x.dtype)", "return (p @ means).to(x.dtype)"),
    (TOY, "x = self.means[k] + self.std * torch.randn(", "x = self.means[k] + self.std**2 * torch.randn("),
    (TOY, "labels = None if self.classes is None else one_hot(self.classes[k], self.label_dim, dtype)",
        "labels = None if self.classes is None else one_hot(self.classes[(k + 1) % len(self.classes)], "
        "self.label_dim, dtype)"),
    (TOY, "k3 = f(x + h / 2 * k2, lam + h / 2)", "k3 = f(x + h / 2 * k1, lam + h / 2)"),
    (TOY, "x, lam = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h",
           "x, lam = x + h / 4 * (k1 + k2 + k3 + k4), lam + h"),
    (TOY, "a = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)",
           "a = torch.arange(8, dtype=torch.float64) * (math.pi / 8)"),
    (TOY, "a = 2 * math.pi * turns * u", "a = math.pi * turns * u"),
    (TOY, "xy[(cell.sum(1) % 2) == 0]", "xy[(cell.sum(1) % 2) == 1]"),
    (TOY, "logits = logits + labels.to(torch.float64)[:, self.classes.to(x.device)].log()",
        "logits = logits + labels.to(torch.float64)[:, self.classes.to(x.device)]"),
    # ---- checkpoint loader
    (CK, '    ("numpy", "dtype"): np.dtype,\n', '    ("numpy", "dtype"): np.dtype,\n    ("builtins", "exec"): exec,\n'),
    (CK, '    ("numpy", "dtype"): np.dtype,\n',
         '    ("numpy", "dtype"): np.dtype,\n'
         '    ("subprocess", "check_output"): __import__("subprocess").check_output,\n'),
    (CK, '    ("numpy", "dtype"): np.dtype,\n',
          '    ("numpy", "dtype"): np.dtype,\n    ("builtins", "getattr"): getattr,\n'),
    (CK, '("torch.storage", "_load_from_bytes"): _storage_from_bytes,',
          '("torch.storage", "_load_from_bytes"): torch.storage._load_from_bytes,'),
    (CK, 'raise pickle.UnpicklingError(f"refused global {module}.{name} in a storage record: only torch storage "',
         'return pickle.Unpickler.find_class(self, module, name)\n'
         '        raise pickle.UnpicklingError(f"refused global {module}.{name} in a storage record: '
         'only torch storage "'),
    (CK, 'if len(data) != start + numel * itemsize or int.from_bytes',
          'if len(data) < start + numel * itemsize or int.from_bytes'),
    (CK, "type(requires_grad) is bool and isinstance(backward_hooks, dict) and not backward_hooks and not metadata):",
         "type(requires_grad) is bool and isinstance(backward_hooks, dict)):"),
    (CK, 'if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf"',
          'if not isinstance(dtype, np.dtype) or dtype.kind not in "biufcO"'),
    (CK, '        raise pickle.UnpicklingError("refused persistent id: not part of an EDM network pickle")',
         '        return pid'),
    (CK, 'if meta.get("type") != "class" or meta.get("version") != 6:', 'if meta.get("type") != "class":'),
    (CK, "if t is None or name in skip:", "if t is None:"),
    (CK, "obj = torch.load(path, map_location=\"cpu\", weights_only=True)",
          "obj = torch.load(path, map_location=\"cpu\", weights_only=False)"),
    (CK, "if obj and all(k.startswith(\"model.\") for k in obj):",
          "if obj and any(k.startswith(\"model.\") for k in obj):"),
    (CK, "if args or not isinstance(kwargs, dict):", "if not isinstance(kwargs, dict):"),
    (CK, "if not isinstance(child, (_Persistent, _Container)):", "if False:"),
    # ---- second batch: RNG sharing, dtypes, wrappers, guards
    (C, "with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):", "if True:"),
    (E, "return denoise(self.model, x, sigma, labels, self.sigma_data)",
         "return denoise(self.model, x, sigma, labels)"),
    (T, "params = {name: p.detach() for name, p in net.named_parameters()}",
        "params = {name: p for name, p in net.named_parameters()}"),
    (T, "lambda_dsm = cfg.dsm_weight * adaptive_weight(", "lambda_dsm = adaptive_weight("),
    (T, "h = B // 2", "h = B // 3"),
    (T, "if cfg.use_dsm and last_layer is None:", "if last_layer is None and False:"),
    (M, "cfg.huber_eps**2).sqrt() - cfg.huber_eps", "cfg.huber_eps**2).sqrt()"),
    (M, "safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))", "safe = sigma"),
    (A, "    return x.to(noise.dtype)\n", "    return x\n"),
    (TOY, "n = max(1, math.ceil(float((lam_t - lam_s).abs().max()) * steps_per_unit))",
          "n = max(1, math.ceil(float((lam_t - lam_s).abs().min()) * steps_per_unit))"),
    (CK, "return any(part.endswith(\"_s\") for part in key.split(\".\"))", "return key.endswith(\"_s\")"),
    # ---- third batch: broadcasting, loop bounds, guards an independent reader might slip on
    (E, "return v.reshape(-1, *([1] * (x.ndim - 1)))", "return v.reshape(-1, 1)"),
    (A, "out.append(x_var_empirical(x, x_hat, eta).mean())", "out.append(x_var_empirical(x, x_hat, eta).mean() / eta)"),
    (A, "eps_hat = (x64 - x_hat64) / sigma_t ", "eps_hat = (x64 - x_hat64) "),
    (TOY, "k4 = f(x + h * k3, lam + h)", "k4 = f(x + h * k3, lam)"),
    (TOY, "k2 = f(x + h / 2 * k1, lam + h / 2)", "k2 = f(x + h * k1, lam + h / 2)"),
    (TOY, "if bool((lam_s > lam_t).any()):", "if False:"),
    (M, "frac * (math.log(cfg.N_end) - math.log(cfg.N_start))", "frac * (cfg.N_end - cfg.N_start)"),
    (T, "t_steps = sigma_grid(nfe + 1, cfg.sigma_min", "t_steps = sigma_grid(nfe + 2, cfg.sigma_min"),
    (CK, "return np.frombuffer(data, dtype=dtype, count=1)[0].item()", "return np.frombuffer(data, dtype=dtype)[0]"),
    (CK, "missing = [k for k in expected if k not in state and not is_s_key(k)]",
         "missing = [k for k in expected if k not in state and is_s_key(k)]"),
]


# The targeted tests first, so that `-x` stops a killed mutant early; every maths test runs for a survivor.
FIRST = {CK: ["test_checkpoint_security.py", "test_checkpoint.py"], TOY: ["test_toy_datasets.py", "test_toy.py"]}
ORDER = ["test_weightings.py", "test_samplers.py", "test_jumpers.py", "test_loss_draws.py", "test_ema.py",
         "test_toy_datasets.py", "test_checkpoint_security.py", "test_edm.py", "test_cd.py", "test_ctm.py",
         "test_mcm.py", "test_addim.py", "test_analytic_precond.py", "test_toy.py", "test_checkpoint.py",
         "test_distillation.py"]


def run(workdir, timeout, path=None, deselect=(), stop_early=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    first = FIRST.get(path, [])
    files = [os.path.join("tests", f) for f in first + [f for f in ORDER if f not in first]]
    flags = ["-x"] if stop_early else []
    flags += [a for test in deselect for a in ("--deselect", test)]
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "maths", "-q", "-p", "no:cacheprovider",
                            "--hypothesis-seed=0", *flags, *files], cwd=workdir, env=env, capture_output=True,
                           text=True, timeout=timeout)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired:
        return "timeout", ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="only mutants whose file or text contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--start", type=int, default=0, help="only mutants from this index on")
    args = ap.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTANTS) if i >= args.start and (args.k in m[0] or args.k in m[1] or
                                                                          args.k in m[2])]
    if args.list:
        for i, m in chosen:
            print(i, m[0], repr(m[1]), "->", repr(m[2]), *m[3:])
        return
    work = tempfile.mkdtemp(prefix="mut-wt-")
    try:
        shutil.copytree(ROOT, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".hypothesis", "__pycache__", ".ci-venv", "runs", "out*"))
        rc, out = run(work, args.timeout, stop_early=False)
        # Tests that already fail without a mutant cannot kill one: they are left out, and named.
        broken = [line.split()[1] for line in out.splitlines() if line.startswith("FAILED")]
        if rc != 0 and not broken:
            raise SystemExit(f"the unmutated maths tests do not run in {work}:\n{out[-3000:]}")
        for test in broken:
            print(f"left out (fails without a mutant): {test}", flush=True)
        killed, survived, equivalent = [], [], []
        for i, (path, old, new, *note) in chosen:
            src_path = os.path.join(work, path)
            src = open(src_path).read()
            if src.count(old) != 1:
                raise SystemExit(f"mutant {i}: {old!r} occurs {src.count(old)} times in {path}")
            if note and note[0].startswith("equivalent"):
                equivalent.append((i, path, old, new, note[0]))
                continue
            open(src_path, "w").write(src.replace(old, new))
            t0 = time.time()
            rc, out = run(work, args.timeout, path, broken)
            open(src_path, "w").write(src)
            status = "killed" if rc != 0 else "SURVIVED"
            failed = next((l for l in out.splitlines() if l.startswith("FAILED")), "")
            print(f"[{i:3d}] {status:8s} {time.time() - t0:5.1f}s {path}: {new.strip()[:70]}  {failed[:90]}",
                  flush=True)
            (killed if rc != 0 else survived).append((i, path, old, new))
        n = len(killed) + len(survived)
        print(f"\nkilled {len(killed)} of {n} non-equivalent mutants ({100 * len(killed) / max(n, 1):.1f} %); "
              f"{len(equivalent)} judged equivalent")
        for i, path, old, new in survived:
            print(f"  survived [{i}] {path}: {old.strip()!r} -> {new.strip()!r}")
        for i, path, old, new, why in equivalent:
            print(f"  equivalent [{i}] {path}: {old.strip()!r} -> {new.strip()!r} ({why})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
