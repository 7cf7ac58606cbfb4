"""The checkpoint importer: EDM pickles are read without running anything from them, and give back the network.

The test pickles are written in NVlabs' persistence layout by tests/edm_pickle.py, armed: every network object's
`meta['module_src']` would, if executed, write a marker file and raise.
"""
import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoint import (CheckpointError, load_edm_pickle, load_state_dict_file, load_teacher_into_student,
                                 read_state_dict_file)
from networks.edm_unet import DHARIWALUNET_CONFIGS, SONGUNET_CONFIGS, DhariwalUNet, SongUNet
from tests.edm_pickle import nvlabs_modules, write_edm_pickle

CASES = [pytest.param(SongUNet, SONGUNET_CONFIGS["tiny-ddpmpp-cond-32"], id="ddpmpp-cond"),
         pytest.param(SongUNet, SONGUNET_CONFIGS["tiny-ncsnpp-16"], id="ncsnpp"),      # random Fourier buffer
         pytest.param(DhariwalUNet, DHARIWALUNET_CONFIGS["tiny-adm-cond-16"], id="adm-cond")]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # initialisations do not depend on test order


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
# Writing pickles in the EDM persistence layout (tests/edm_pickle.py), armed: module_src writes a marker and raises

@pytest.fixture
def marker(tmp_path):
    return tmp_path / "module_src_ran"


def hostile_src(marker):
    return f"open({str(marker)!r}, 'w').write('pwned')\nraise RuntimeError('module_src was executed')\n"


@pytest.fixture
def write_pkl(tmp_path, marker):
    def write(net, kwargs, name="edm.pkl", **kw):
        return write_edm_pickle(tmp_path / name, net, kwargs, hostile_src(marker), **kw)
    return write


# ------------------------------------------------------------------------------------------------------------------
# Loading

@pytest.mark.parametrize("cls,kwargs", CASES)
def test_edm_pickle_loads_without_running_module_src_and_reproduces_outputs(cls, kwargs, write_pkl, marker):
    net = perturb_(cls(**kwargs)).eval()
    path = write_pkl(net, kwargs)
    assert not {"torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"} & set(sys.modules)  # none of NVlabs'
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
    with nvlabs_modules(), pytest.raises(RuntimeError, match="module_src was executed"):
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


# ------------------------------------------------------------------------------------------------------------------
# Storage records: the nested legacy torch.save blob of every tensor, read by our own strict reader

def legacy_storage_blob(values, dtype_class, location="cpu", body=None, trailing=b"", little_endian=True):
    """A storage record in torch's legacy torch.save layout, written out from the format itself: the pickles of the
    magic number 0x1950a86a20f9469cfc6c, protocol 1001 and a sys_info dict; the object (here the storage, as the
    persistent id ('storage', <dtype>Storage, key, location, numel, None)); the key list; then an int64 element
    count and the raw little-endian bytes."""
    raw = values.numpy().tobytes()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", dtype_class, "0", location, values.numel(), None) if obj is values else None

    out = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": little_endian,
                                                "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, out, protocol=2)
    P(out, protocol=2).dump(values if body is None else body)
    pickle.dump(["0"], out, protocol=2)
    return out.getvalue() + values.numel().to_bytes(8, "little") + raw + trailing


def load_restricted(data):
    from networks.checkpoint import _RestrictedUnpickler
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def storage_call(blob):
    return pickle.dumps(CallsGlobal(torch.storage._load_from_bytes, blob))


@pytest.mark.parametrize("dtype,cls", [(torch.float32, torch.FloatStorage), (torch.float16, torch.HalfStorage),
                                       (torch.int64, torch.LongStorage), (torch.uint8, torch.ByteStorage)])
def test_storage_records_are_read_to_cpu_whatever_device_they_were_saved_from(dtype, cls):
    values = (torch.arange(7) * 3 - 5).to(dtype) if dtype != torch.uint8 else torch.arange(7, dtype=dtype) * 30
    for location in ("cpu", "cuda:0"):
        storage = load_restricted(storage_call(legacy_storage_blob(values, cls, location)))
        t = torch.empty(0, dtype=dtype).set_(storage._untyped_storage)
        assert storage.dtype == dtype and t.device.type == "cpu" and torch.equal(t, values)


def test_tensors_pickled_by_torch_itself_round_trip():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64),
               torch.randn(2, 3, generator=g).bfloat16(), torch.randn(4, 4, generator=g)[1:, ::2],
               nn.Parameter(torch.randn(3, generator=g)), torch.tensor([True, False])]
    for t in tensors:
        back = load_restricted(pickle.dumps(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_plain_storage_records_need_no_torch_load_and_all_others_are_read_weights_only(marker, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    values = torch.arange(4.0)
    for t in (values, torch.randn(2, 3).bfloat16(), nn.Parameter(torch.ones(3))):
        assert torch.equal(load_restricted(pickle.dumps(t)), t)
    assert calls == []                                                      # parsed by the reader of our own
    hostile = legacy_storage_blob(values, torch.FloatStorage, body=CallsGlobal(os.system, f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_restricted(storage_call(hostile))
    assert not marker.exists() and calls == [{"weights_only": True}]
    odd = {"a dict around the storage": legacy_storage_blob(values, torch.FloatStorage, body={"s": values}),
           "big-endian": legacy_storage_blob(values, torch.FloatStorage, little_endian=False),
           "trailing bytes": legacy_storage_blob(values, torch.FloatStorage, trailing=b"\0")}
    for blob in odd.values():
        calls.clear()
        try:
            load_restricted(storage_call(blob))
        except Exception:  # noqa: BLE001 - whatever torch's reader makes of it
            pass
        assert calls == [{"weights_only": True}]


def test_the_network_is_built_without_running_its_initialisation(write_pkl):
    kwargs = SONGUNET_CONFIGS["tiny-ddpmpp-8"]                              # no random Fourier buffer
    path = write_pkl(perturb_(SongUNet(**kwargs)).eval(), kwargs)
    SongUNet(**kwargs)
    state = torch.random.get_rng_state()
    SongUNet(**kwargs)
    assert not torch.equal(torch.random.get_rng_state(), state)             # initialising draws random numbers
    state = torch.random.get_rng_state()
    load_edm_pickle(path)
    assert torch.equal(torch.random.get_rng_state(), state)                 # loading does not


def test_tensor_records_with_hooks_or_metadata_are_refused():
    import collections
    storage = torch.arange(4.0).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    rebuild = torch._utils._rebuild_tensor_v2
    assert torch.equal(load_restricted(pickle.dumps(CallsGlobal(rebuild, typed, 1, (2,), (1,), False,
                                                                collections.OrderedDict()))), torch.tensor([1.0, 2]))
    for args in [(typed, 0, (2,), (1,), False, collections.OrderedDict(hook=1)),     # a backward hook
                 (typed, 0, (2,), (1,), False, collections.OrderedDict(), {"conj": True}),  # tensor metadata
                 (typed, 0, (2,), (1,), 1, collections.OrderedDict())]:               # requires_grad not a bool
        with pytest.raises(pickle.UnpicklingError, match="refused tensor record"):
            load_restricted(pickle.dumps(CallsGlobal(rebuild, *args)))
    with pytest.raises(pickle.UnpicklingError, match="refused parameter record"):
        load_restricted(pickle.dumps(CallsGlobal(torch._utils._rebuild_parameter, torch.ones(2), True,
                                                 collections.OrderedDict(hook=1))))
