"""Write a network as an NVlabs EDM `.pkl`, in the layout the published checkpoints use, for end-to-end runs.

The layout is the one tests/test_checkpoint.py builds (every network object a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` whose `module_src` a normal unpickler would execute,
torch's own reduction for ModuleDicts and tensors, numpy scalars for a few floats, a dnnlib EasyDict for
dataset_kwargs). Here it is a plain function, usable outside a pytest fixture: the two modules the pickle names
exist only while it is written. `module_src` writes `marker` and raises, so a loader that ever ran it would
leave the marker behind.
"""
import contextlib
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
from torch import nn


class _Persistent:
    def __init__(self, class_name, state, module_src):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


@contextlib.contextmanager
def _edm_modules():
    """`torch_utils.persistence` and `dnnlib.util` as importable names while pickling; restored afterwards."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # what NVlabs' unpickler does: run the class's source
        exec(compile(meta["module_src"], "<module_src>", "exec"), {})
        return meta

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield util
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _layout(module, src):
    children = OrderedDict((k, _layout(v, src)) for k, v in module._modules.items())
    if type(module) is nn.ModuleDict:
        holder = nn.ModuleDict()
        holder.__dict__["_modules"] = children
        return holder
    state = dict(module.__dict__, _modules=children, _init_args=(), _init_kwargs={})
    if "skip_scale" in state:  # EDM stores np.sqrt(0.5) here
        state["skip_scale"] = np.float64(state["skip_scale"])
        state["_init_kwargs"] = dict(skip_scale=np.float64(state["skip_scale"]))
    return _Persistent(type(module).__name__, state, src)


def write_edm_pickle(path, net, kwargs, marker):
    """Pickle `net` (a SongUNet or DhariwalUNet built from `kwargs`) as EDM's {'ema': EDMPrecond(model=net), ...}."""
    src = f"open({str(marker)!r}, 'w').write('module_src ran')\nraise RuntimeError('module_src was executed')\n"
    with _edm_modules() as util:
        model = _layout(net, src)
        model.meta["state"]["_init_kwargs"] = dict(kwargs, dropout=np.float64(kwargs.get("dropout", 0.0)))
        ema_state = dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(),
                         _non_persistent_buffers_set=set(), _modules=OrderedDict(model=model), _init_args=(),
                         img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim,
                         use_fp16=False, sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5,
                         _init_kwargs=dict(kwargs, model_type=type(net).__name__))
        data = dict(ema=_Persistent("EDMPrecond", ema_state, src),
                    loss_fn=_Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), src),
                    augment_pipe=None,
                    dataset_kwargs=util.EasyDict(class_name="training.dataset.ImageFolderDataset", path="data.zip"))
        with open(path, "wb") as f:
            pickle.dump(data, f)
    return path
