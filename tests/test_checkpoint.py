"""The checkpoint importer: EDM pickles are read without running anything from them, and give back the network.

The test pickles are built here in NVlabs' persistence layout (`torch_utils.persistence` of NVlabs/edm): every network object is
a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` whose `meta['module_src']` would, if executed,
write a marker file and raise; the nn.ModuleDicts are pickled by torch's ordinary reduction, tensors by torch's
reducers, a few constructor floats are numpy scalars and dataset_kwargs is a dnnlib EasyDict, as in the real files.
"""
import io
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoint import (CheckpointError, load_edm_pickle, load_state_dict_file, load_teacher_into_student,
                                 read_state_dict_file)
from networks.edm_unet import DHARIWALUNET_CONFIGS, SONGUNET_CONFIGS, DhariwalUNet, SongUNet

CASES = [pytest.param(SongUNet, SONGUNET_CONFIGS["tiny-ddpmpp-cond-32"], id="ddpmpp-cond"),
         pytest.param(SongUNet, SONGUNET_CONFIGS["tiny-ncsnpp-16"], id="ncsnpp"),      # random Fourier buffer
         pytest.param(DhariwalUNet, DHARIWALUNET_CONFIGS["tiny-adm-cond-16"], id="adm-cond")]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)                                                    # initialisations do not depend on test order


def perturb_(net, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def inputs(net, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = net.img_resolution
    x, c_noise = torch.randn(B, 3, R, R, generator=g), torch.randn(B, generator=g)
    labels = None
    if net.label_dim:
        labels = F.one_hot(torch.randint(net.label_dim, (B,), generator=g), net.label_dim).float()
    return x, c_noise, labels


# ------------------------------------------------------------------------------------------------------------------
# Writing pickles in the EDM persistence layout

class Persistent:
    """Pickles as `_reconstruct_persistent_obj(meta)`, as NVlabs' persistent classes do."""

    def __init__(self, class_name, state, module_src):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


@pytest.fixture
def edm_modules(monkeypatch):
    """Fake `torch_utils.persistence` and `dnnlib.util` to pickle by name. Their `_reconstruct_persistent_obj`
    does what NVlabs' does on a normal load: exec module_src. Removed again after the test."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(compile(meta["module_src"], "<module_src>", "exec"), {})
        return meta

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    for name, module in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                         "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return util


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "module_src_ran"


def hostile_src(marker):
    return f"open({str(marker)!r}, 'w').write('pwned')\nraise RuntimeError('module_src was executed')\n"


def edm_layout(module, src):
    """Our module tree as NVlabs' pickles hold it: persistent records, except plain torch ModuleDicts."""
    children = OrderedDict((k, edm_layout(v, src)) for k, v in module._modules.items())
    if type(module) is nn.ModuleDict:
        holder = nn.ModuleDict()
        holder.__dict__["_modules"] = children
        return holder
    state = dict(module.__dict__, _modules=children, _init_args=(), _init_kwargs={})
    if "skip_scale" in state:                                               # EDM stores np.sqrt(0.5) here
        state["skip_scale"] = np.float64(state["skip_scale"])
        state["_init_kwargs"] = dict(skip_scale=np.float64(state["skip_scale"]))
    return Persistent(type(module).__name__, state, src)


def edm_pickle_bytes(net, kwargs, src, util, precond="EDMPrecond", **extra):
    model = edm_layout(net, src)
    model.meta["state"]["_init_kwargs"] = dict(kwargs, dropout=np.float64(kwargs["dropout"]))
    ema_state = dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(),
                     _non_persistent_buffers_set=set(), _modules=OrderedDict(model=model), _init_args=(),
                     img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim,
                     use_fp16=False, sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5,
                     _init_kwargs=dict(kwargs, model_type=type(net).__name__))
    data = dict(ema=Persistent(precond, ema_state, src),
                loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5), src),
                augment_pipe=None,
                dataset_kwargs=util.EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"),
                **extra)
    return pickle.dumps(data)


@pytest.fixture
def write_pkl(tmp_path, edm_modules, marker):
    def write(net, kwargs, name="edm.pkl", **kw):
        path = tmp_path / name
        path.write_bytes(edm_pickle_bytes(net, kwargs, hostile_src(marker), edm_modules, **kw))
        return path
    return write


# ------------------------------------------------------------------------------------------------------------------
# Loading

@pytest.mark.parametrize("cls,kwargs", CASES)
def test_edm_pickle_loads_without_running_module_src_and_reproduces_outputs(cls, kwargs, write_pkl, marker,
                                                                           monkeypatch):
    net = perturb_(cls(**kwargs)).eval()
    path = write_pkl(net, kwargs)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name)                              # nothing of NVlabs' is importable
    ckpt = load_edm_pickle(path)
    assert not marker.exists()
    assert type(ckpt.net) is cls and ckpt.net_kwargs == kwargs and not ckpt.net.training
    assert ckpt.precond == dict(sigma_data=0.5, sigma_min=0.0, sigma_max=float("inf"), use_fp16=False,
                                img_resolution=net.img_resolution, img_channels=3, label_dim=net.label_dim)
    x, c_noise, labels = inputs(net)
    assert torch.equal(ckpt.net(x, c_noise, labels), net(x, c_noise, labels))


def test_the_test_pickle_is_armed(write_pkl, marker):
    # The same bytes through a normal unpickler (NVlabs' loader execs module_src) do run the hostile code,
    # so the test above would notice if load_edm_pickle ever executed it.
    path = write_pkl(SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-8"]), SONGUNET_CONFIGS["tiny-ddpmpp-8"])
    with pytest.raises(RuntimeError, match="module_src was executed"):
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


def test_a_student_starts_from_an_imported_teacher(write_pkl):
    kwargs = dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], label_dim=10)
    teacher = load_edm_pickle(write_pkl(perturb_(SongUNet(**kwargs)).eval(), kwargs)).net
    student = SongUNet(**kwargs, s_embedding=True).eval()
    load_teacher_into_student(student, teacher)
    x, c_noise, labels = inputs(teacher)
    assert torch.equal(student(x, c_noise, labels, c_noise - 1.0), teacher(x, c_noise, labels))


def test_teacher_into_student_refuses_anything_but_missing_s_keys():
    kwargs = SONGUNET_CONFIGS["tiny-ddpmpp-8"]
    teacher = SongUNet(**kwargs).state_dict()
    student = SongUNet(**kwargs, s_embedding=True)
    with pytest.raises(CheckpointError, match="missing non-s keys"):
        load_teacher_into_student(student, {k: v for k, v in teacher.items() if k != "map_layer1.bias"})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_teacher_into_student(SongUNet(**kwargs, s_embedding=True),
                                  SongUNet(**dict(kwargs, augment_dim=9)).state_dict())


# ------------------------------------------------------------------------------------------------------------------
# Refusals

class CallsGlobal:
    """Pickles as a call of an arbitrary global, the way a malicious pickle runs code."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn,args,name", [
    (os.system, ("touch {marker}",), f"{os.system.__module__}.system"),
    (eval, ("open({marker!r}, 'w')",), "builtins.eval"),
    (getattr, ("text", "upper"), "builtins.getattr"),
    (nn.Linear, (2, 2), "torch.nn.modules.linear.Linear"),                  # real, but not an EDM container
    (np.array, ([1.0],), "numpy"),
])
def test_unexpected_globals_are_refused_before_they_run(fn, args, name, write_pkl, marker):
    args = tuple(a.format(marker=str(marker)) if isinstance(a, str) else a for a in args)
    net = SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-8"])
    path = write_pkl(net, SONGUNET_CONFIGS["tiny-ddpmpp-8"], payload=CallsGlobal(fn, *args))
    with pytest.raises(CheckpointError, match=f"{path}: refused global {name}"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_a_hostile_object_inside_the_network_state_is_refused(write_pkl, marker):
    net = SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-8"])
    net.__dict__["label_dropout"] = CallsGlobal(os.system, f"touch {marker}")
    path = write_pkl(net, SONGUNET_CONFIGS["tiny-ddpmpp-8"])
    with pytest.raises(CheckpointError, match="refused global"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_truncated_foreign_and_malformed_files_are_named_and_explained(tmp_path, write_pkl):
    kwargs = SONGUNET_CONFIGS["tiny-ddpmpp-8"]
    good = write_pkl(SongUNet(**kwargs), kwargs).read_bytes()
    cases = {
        "truncated.pkl": (good[: len(good) // 2], "truncated"),
        "empty.pkl": (b"", "not a pickle"),
        "picture.pkl": (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a pickle"),
        "other.pkl": (pickle.dumps({"weights": [1, 2, 3]}), "expected a dict with 'ema'"),
        "garbage.pkl": (b"\x80\x04\x95" + bytes(range(200, 256)), "malformed|refused|truncated"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=match) as info:
            load_edm_pickle(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    torch.save(SongUNet(**kwargs).state_dict(), tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="zip archive.*load_state_dict_file"):
        load_edm_pickle(tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_edm_pickle(tmp_path / "missing.pkl")


def test_pickles_that_do_not_match_our_networks_are_refused(write_pkl):
    kwargs = SONGUNET_CONFIGS["tiny-ddpmpp-8"]
    net = SongUNet(**kwargs)
    with pytest.raises(CheckpointError, match="VPPrecond.*baseline"):
        load_edm_pickle(write_pkl(net, kwargs, precond="VPPrecond"))
    with pytest.raises(CheckpointError, match=r"arguments \['use_magic'\] are not supported"):
        load_edm_pickle(write_pkl(net, dict(kwargs, use_magic=True)))
    with pytest.raises(CheckpointError, match=r"1 missing keys \['dec.8x8_aux_conv.bias'\]"):
        load_edm_pickle(write_pkl(_without(SongUNet(**kwargs), "dec.8x8_aux_conv", "bias"), kwargs))
    with pytest.raises(CheckpointError, match="of wrong shape"):
        load_edm_pickle(write_pkl(SongUNet(**dict(kwargs, model_channels=64)), kwargs))


def _without(net, module_name, param):
    net.get_submodule(module_name).register_parameter(param, None)
    return net


# ------------------------------------------------------------------------------------------------------------------
# Plain state dicts

def test_state_dict_files_round_trip_with_or_without_the_model_prefix(tmp_path):
    kwargs = DHARIWALUNET_CONFIGS["tiny-adm-cond-16"]
    net = perturb_(DhariwalUNet(**kwargs)).eval()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({f"model.{k}": v for k, v in net.state_dict().items()}, tmp_path / "precond.pt")
    x, c_noise, labels = inputs(net)
    for name in ("plain.pt", "precond.pt"):
        loaded = load_state_dict_file(tmp_path / name, DhariwalUNet(**kwargs)).eval()
        assert torch.equal(loaded(x, c_noise, labels), net(x, c_noise, labels))


def test_state_dict_files_that_are_not_plain_tensors_are_refused(tmp_path, marker):
    kwargs = SONGUNET_CONFIGS["tiny-ddpmpp-8"]
    net = SongUNet(**kwargs)
    torch.save(net, tmp_path / "module.pt")                                  # a pickled module: code by name
    with pytest.raises(CheckpointError, match="module.pt: refused by torch.load"):
        read_state_dict_file(tmp_path / "module.pt")
    torch.save({"payload": CallsGlobal(os.system, f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused by torch.load"):
        read_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()
    data = (tmp_path / "module.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable torch.save file"):
        read_state_dict_file(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: holds a list"):
        read_state_dict_file(tmp_path / "list.pt")
    torch.save(SongUNet(**dict(kwargs, model_channels=64)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="wide.pt: does not match SongUNet"):
        load_state_dict_file(tmp_path / "wide.pt", net)
    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        read_state_dict_file(tmp_path / "nothing.pt")


def test_numpy_scalars_of_numpy_1_and_2_pickles_are_numbers_and_object_scalars_are_refused():
    from networks.checkpoint import _RestrictedUnpickler

    def load(data):
        return _RestrictedUnpickler(io.BytesIO(data)).load()

    new = pickle.dumps(np.float64(0.5) ** 0.5, protocol=3)                  # GLOBAL 'numpy._core.multiarray scalar'
    old = new.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as written by the numpy 1.x of 2022
    assert b"numpy.core.multiarray" in old
    for data in (new, old):
        value = load(data)
        assert type(value) is float and value == 0.5 ** 0.5
    scalar = np.float64(1.0).__reduce__()[0]                                # numpy's scalar reconstructor
    with pytest.raises(pickle.UnpicklingError, match="refused numpy scalar of dtype"):
        load(pickle.dumps(CallsGlobal(scalar, np.dtype(object), "an object")))
