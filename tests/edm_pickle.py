"""Writes network pickles in the layout of NVlabs' published EDM checkpoints, for tests and benchmarks.

Every network object is pickled as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version: 6, module_src, class_name, state}; the nn.ModuleDicts by torch's ordinary reduction,
tensors by torch's reducers (each storage a nested legacy `torch.save` blob), a few constructor floats as numpy
scalars, and `dataset_kwargs` as a `dnnlib.util.EasyDict`, as in the real files (edm-cifar10-32x32-*.pkl, ...).

`torch_utils` and `dnnlib` are not installed, so stand-in modules of those names are put into `sys.modules` while a
pickle is written (`nvlabs_modules`). Their `_reconstruct_persistent_obj` does what NVlabs' own does on a normal
`pickle.load`: it executes `module_src`, so a pickle written with a hostile `module_src` shows whether a loader ran it.

    write_edm_pickle(path, net, kwargs, module_src=HARMLESS_SRC, precond="EDMPrecond", use_fp16=False, **extra)
    edm_pickle_bytes(net, kwargs, module_src=HARMLESS_SRC, precond="EDMPrecond", use_fp16=False, **extra)

`net` is one of our SongUNet / DhariwalUNet built with `kwargs` (its weights are what gets stored, as 'ema.model');
`precond` names the wrapper class (e.g. 'VPPrecond' for a baseline), `use_fp16` is stored in it, and `extra`
adds top-level entries (e.g. a payload to be refused). `write_edm_pickle` returns `path`.
"""
import contextlib
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
from torch import nn

HARMLESS_SRC = "# the class's source file would be here\n"


def marker_src(marker):
    """A `module_src` that writes the file `marker` and raises if it is ever executed (a loader must never run it)."""
    return f"open({str(marker)!r}, 'w').write('module_src ran')\nraise RuntimeError('module_src was executed')\n"


def _reconstruct_persistent_obj(meta):
    exec(compile(meta["module_src"], "<module_src>", "exec"), {})
    return meta


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_persistence = types.ModuleType("torch_utils.persistence")
_persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
_util = types.ModuleType("dnnlib.util")
_util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
MODULES = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": _persistence,
           "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": _util}


@contextlib.contextmanager
def nvlabs_modules():
    """The stand-in `torch_utils.persistence` and `dnnlib.util` in sys.modules for the duration (re-entrant)."""
    saved = {name: sys.modules.get(name) for name in MODULES}
    sys.modules.update(MODULES)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Persistent:
    """Pickles as `_reconstruct_persistent_obj(meta)`, as NVlabs' persistent classes do."""

    def __init__(self, class_name, state, module_src):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


def edm_layout(module, src):
    """Our module tree as NVlabs' pickles hold it: persistent records, except plain torch ModuleDicts."""
    children = OrderedDict((k, edm_layout(v, src)) for k, v in module._modules.items())
    if type(module) is nn.ModuleDict:
        holder = nn.ModuleDict()
        holder.__dict__["_modules"] = children
        return holder
    state = dict(module.__dict__, _modules=children, _init_args=(), _init_kwargs={})
    if "skip_scale" in state:  # EDM stores np.sqrt(0.5) here
        state["skip_scale"] = np.float64(state["skip_scale"])
        state["_init_kwargs"] = dict(skip_scale=np.float64(state["skip_scale"]))
    return Persistent(type(module).__name__, state, src)


def edm_pickle_bytes(net, kwargs, module_src=HARMLESS_SRC, precond="EDMPrecond", use_fp16=False, **extra):
    model = edm_layout(net, module_src)
    model.meta["state"]["_init_kwargs"] = dict(kwargs, dropout=np.float64(kwargs.get("dropout", 0.0)))
    ema_state = dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(),
                     _non_persistent_buffers_set=set(), _modules=OrderedDict(model=model), _init_args=(),
                     img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim,
                     use_fp16=use_fp16, sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5,
                     _init_kwargs=dict(kwargs, model_type=type(net).__name__))
    data = dict(ema=Persistent(precond, ema_state, module_src),
                loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), module_src),
                augment_pipe=None,
                dataset_kwargs=_util.EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"),
                **extra)
    with nvlabs_modules():
        return pickle.dumps(data)


def write_edm_pickle(path, net, kwargs, module_src=HARMLESS_SRC, precond="EDMPrecond", use_fp16=False, **extra):
    path.write_bytes(edm_pickle_bytes(net, kwargs, module_src, precond, use_fp16, **extra))
    return path
