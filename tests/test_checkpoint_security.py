"""The restricted unpickler of networks/checkpoint.py is fail-closed: its allowlist is exactly the globals an EDM
network pickle needs, every other global is refused before it runs, nested storage records are read weights-only,
persistent ids are refused, and the object tree must have NVlabs' layout (type 'class', version 6)."""
import io
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from networks import checkpoint
from networks.checkpoint import CheckpointError, load_edm_pickle, read_state_dict_file
from networks.edm_unet import SONGUNET_CONFIGS, SongUNet

# Written out from what an NVlabs EDM pickle holds (module docstring of networks/checkpoint.py): the persistence
# call, EasyDict, torch's three container modules, torch's tensor/parameter/storage rebuilders, OrderedDict, sets,
# and numpy scalars (numpy 1.x and 2.x module names) with their dtype.
ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("dnnlib.util", "EasyDict"),
    ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "Sequential"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch.storage", "_load_from_bytes"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
}

HOSTILE = [
    ("builtins", "exec"), ("builtins", "eval"), ("builtins", "compile"), ("builtins", "open"),
    ("builtins", "getattr"), ("builtins", "setattr"), ("builtins", "__import__"), ("builtins", "globals"),
    ("builtins", "type"), ("builtins", "object"), ("builtins", "breakpoint"), ("builtins", "dict"),
    ("builtins", "list"), ("builtins", "bytearray"), ("os", "system"), ("os", "popen"), ("os", "execv"),
    ("os", "remove"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("subprocess", "run"), ("shutil", "rmtree"), ("importlib", "import_module"),
    ("runpy", "run_path"), ("pickle", "loads"), ("_pickle", "loads"), ("marshal", "loads"),
    ("types", "FunctionType"), ("types", "CodeType"), ("functools", "partial"), ("functools", "reduce"),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("copyreg", "_reconstructor"), ("sys", "exit"),
    ("ctypes", "CDLL"), ("code", "interact"), ("webbrowser", "open"), ("collections", "defaultdict"),
    ("collections", "namedtuple"), ("torch", "load"), ("torch", "save"), ("torch.serialization", "load"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_from_type_v2"), ("torch", "Tensor"),
    ("torch.nn.modules.module", "Module"), ("torch.nn.modules.linear", "Linear"), ("torch._ops", "ops"),
    ("numpy", "load"), ("numpy", "array"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.lib.npyio", "load"),
    ("torch_utils.persistence", "persistent_class"), ("torch_utils.persistence", "_module_to_src"),
    ("dnnlib.util", "construct_class_by_name"), ("dnnlib.util", "call_func_by_name"),
    ("torch_utils.misc", "copy_params_and_buffers"), ("training.networks", "EDMPrecond"),
]


def test_the_allowlist_is_exactly_the_globals_of_an_edm_network_pickle():
    assert set(checkpoint._ALLOWED) == ALLOWED


def global_pickle(module, name):
    """The smallest pickle that names a global: PROTO 2, GLOBAL 'module name', STOP."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."


@pytest.mark.parametrize("module,name", HOSTILE)
def test_every_other_global_is_refused_by_name(module, name, tmp_path):
    path = tmp_path / "hostile.pkl"
    path.write_bytes(global_pickle(module, name))
    with pytest.raises(CheckpointError, match=f"{path}: refused global {module}.{name}: not part of an EDM"):
        load_edm_pickle(path)


@pytest.mark.parametrize("module,name", sorted(ALLOWED - {("torch_utils.persistence", "_reconstruct_persistent_obj"),
                                                          ("dnnlib.util", "EasyDict")}))
def test_the_allowed_globals_are_served_without_importing_anything_of_nvlabs(module, name):
    """A served global is the object named (or its stand-in), never a refusal."""
    obj = checkpoint._RestrictedUnpickler(io.BytesIO(global_pickle(module, name))).load()
    assert callable(obj)


class Calls:
    """Pickles as a call fn(*args), the way a pickle runs code."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def legacy_torch_save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)             # the format of a storage record
    return buf.getvalue()


def test_a_nested_storage_record_is_read_weights_only(tmp_path):
    """`torch.storage._load_from_bytes` would torch.load its bytes with weights_only=False; the stand-in must not.
    A record whose bytes call os.system is refused and does not run."""
    marker = tmp_path / "ran"
    nested = legacy_torch_save(Calls(os.system, f"touch {marker}"))
    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.dumps({"ema": Calls(torch.storage._load_from_bytes, nested)}, protocol=4))
    with pytest.raises(CheckpointError, match=str(path)):
        load_edm_pickle(path)
    assert not marker.exists()


def test_a_storage_record_of_no_bytes_is_refused():
    bad = pickle.dumps(Calls(torch.storage._load_from_bytes, "not bytes"), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="does not hold bytes"):
        checkpoint._RestrictedUnpickler(io.BytesIO(bad)).load()


def test_tensor_and_parameter_records_with_hooks_or_metadata_are_refused():
    """A plain network pickle holds dense tensors and parameters without backward hooks or tensor metadata; a hook
    is a callable that would run on the first backward pass."""
    t = torch.arange(6.0).reshape(2, 3)
    storage, offset, size, stride = t.untyped_storage(), 0, (2, 3), (3, 1)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    rebuild, parameter = checkpoint._ALLOWED[("torch._utils", "_rebuild_tensor_v2")], checkpoint._ALLOWED[
        ("torch._utils", "_rebuild_parameter")]
    assert torch.equal(rebuild(typed, offset, size, stride, False, OrderedDict()), t)
    for args in [(typed, offset, size, stride, False, OrderedDict(h=print)), (typed, offset, size, stride, False,
                 OrderedDict(), {"x": 1}), (typed, 0.5, size, stride, False, OrderedDict()), (t, offset, size, stride,
                 False, OrderedDict())]:
        with pytest.raises(pickle.UnpicklingError, match="refused tensor record"):
            rebuild(*args)
    assert torch.equal(parameter(t, True, OrderedDict()), t)
    for args in [(t, True, OrderedDict(h=print)), ([1.0], True, OrderedDict()), (t, 1, OrderedDict())]:
        with pytest.raises(pickle.UnpicklingError, match="refused parameter record"):
            parameter(*args)


@pytest.mark.parametrize("data", [b"\x80\x02X\x03\x00\x00\x00abcQ.", b"\x80\x02Pabc\n."], ids=["BINPERSID", "PERSID"])
def test_persistent_ids_are_refused(data, tmp_path):
    path = tmp_path / "persid.pkl"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{path}: refused persistent id"):
        load_edm_pickle(path)


def test_a_persistent_id_written_by_a_pickler_is_refused(tmp_path):
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "0") if isinstance(obj, str) and obj == "external" else None

    buf = io.BytesIO()
    WithIds(buf, protocol=2).dump({"ema": "external"})
    path = tmp_path / "ids.pkl"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="refused persistent id"):
        load_edm_pickle(path)


@pytest.mark.parametrize("value", [np.float32(1.5), np.float64(-2.25), np.int64(7), np.uint8(200), np.bool_(True),
                                   np.int8(-3), np.float16(0.5)], ids=lambda v: type(v).__name__)
def test_numeric_numpy_scalars_become_python_numbers(value):
    got = checkpoint._RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol=4))).load()
    assert type(got) in (int, float, bool) and got == value.item()


@pytest.mark.parametrize("dtype", ["O", "c16", "c8", "U3", "S3", "V4", "M8[s]", "m8[s]"])
def test_numpy_scalars_of_other_kinds_are_refused(dtype):
    scalar = np.float64(1.0).__reduce__()[0]                                 # numpy's scalar reconstructor
    size = np.dtype(dtype).itemsize or 8
    data = pickle.dumps(Calls(scalar, np.dtype(dtype), bytes(size)), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refused numpy scalar"):
        checkpoint._RestrictedUnpickler(io.BytesIO(data)).load()


# ---- the object tree ----------------------------------------------------------------------------------------------

@pytest.fixture
def nvlabs(monkeypatch):
    """Stand-ins for `torch_utils.persistence` and `dnnlib.util`, so that test pickles name their globals; a
    normal unpickler would exec module_src, which here raises."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    return persistence


class Record:
    def __init__(self, class_name, state, **meta):
        self.meta = dict(type="class", version=6, module_src="raise RuntimeError('ran')", class_name=class_name,
                         state=state)
        self.meta.update(meta)

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


def layout(module):
    children = OrderedDict((k, layout(v)) for k, v in module._modules.items())
    if type(module) is nn.ModuleDict:
        holder = nn.ModuleDict()
        holder.__dict__["_modules"] = children
        return holder
    return Record(type(module).__name__, dict(module.__dict__, _modules=children, _init_args=(), _init_kwargs={}))


KW = SONGUNET_CONFIGS["tiny-ddpmpp-8"]


def write(tmp_path, model_record, ema_meta=None):
    ema = Record("EDMPrecond", dict(_parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict(
        model=model_record), sigma_data=0.5))
    ema.meta.update(ema_meta or {})
    path = tmp_path / "edm.pkl"
    path.write_bytes(pickle.dumps({"ema": ema}))
    return path


def model_record(net=None, **meta):
    net = net or SongUNet(**KW)
    rec = layout(net)
    rec.meta["state"]["_init_kwargs"] = dict(KW)
    rec.meta.update(meta)
    return rec


def test_a_minimal_pickle_in_this_layout_loads(nvlabs, tmp_path):
    torch.manual_seed(0)
    net = SongUNet(**KW).eval()
    ckpt = load_edm_pickle(write(tmp_path, model_record(net)))
    assert all(torch.equal(a, b) for a, b in zip(ckpt.net.state_dict().values(), net.state_dict().values()))


@pytest.mark.parametrize("where,meta,match", [
    ("model", dict(version=5), "version 5"), ("model", dict(type="function"), "type 'function'"),
    ("model", dict(class_name="UNetBlock"), "holds a 'UNetBlock'"), ("ema", dict(version=7), "version 7"),
    ("ema", dict(class_name="EDMLoss"), "holds a 'EDMLoss'"),
])
def test_records_of_another_type_version_or_class_are_refused(nvlabs, tmp_path, where, meta, match):
    path = write(tmp_path, model_record(**meta)) if where == "model" else write(tmp_path, model_record(), meta)
    with pytest.raises(CheckpointError, match=match):
        load_edm_pickle(path)


def test_non_persistent_buffers_are_left_out_of_the_state_dict(nvlabs, tmp_path):
    rec = model_record()
    state = rec.meta["state"]
    state["_buffers"] = OrderedDict(state["_buffers"], scratch=torch.zeros(3))
    state["_non_persistent_buffers_set"] = {"scratch"}
    load_edm_pickle(write(tmp_path, rec))                                     # else: 1 unexpected key 'scratch'
    state["_non_persistent_buffers_set"] = ["scratch"]
    with pytest.raises(CheckpointError, match="_non_persistent_buffers_set is a list"):
        load_edm_pickle(write(tmp_path, rec))


def test_a_parameter_that_is_not_a_tensor_and_positional_constructor_arguments_are_refused(nvlabs, tmp_path):
    rec = model_record()
    rec.meta["state"]["_parameters"] = OrderedDict(weight=[1.0, 2.0])
    with pytest.raises(CheckpointError, match="weight is a list, not a tensor"):
        load_edm_pickle(write(tmp_path, rec))
    rec = model_record()
    rec.meta["state"]["_init_args"] = (8,)
    with pytest.raises(CheckpointError, match="constructor arguments"):
        load_edm_pickle(write(tmp_path, rec))


def test_a_child_module_of_a_foreign_type_is_refused(nvlabs, tmp_path):
    rec = model_record()
    first = next(iter(rec.meta["state"]["_modules"]))
    rec.meta["state"]["_modules"][first] = {"not": "a module"}
    with pytest.raises(CheckpointError, match=f"module {first} is a dict"):
        load_edm_pickle(write(tmp_path, rec))


def test_the_model_prefix_is_removed_only_when_every_key_has_it(tmp_path):
    torch.save({"model.a": torch.ones(1), "model.b": torch.zeros(1)}, tmp_path / "all.pt")
    torch.save({"model.a": torch.ones(1), "b": torch.zeros(1)}, tmp_path / "some.pt")
    assert set(read_state_dict_file(tmp_path / "all.pt")) == {"a", "b"}
    assert set(read_state_dict_file(tmp_path / "some.pt")) == {"model.a", "b"}
    torch.save({1: torch.ones(1)}, tmp_path / "intkey.pt")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        read_state_dict_file(tmp_path / "intkey.pt")


def test_a_state_dict_file_that_calls_a_global_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(1), "x": Calls(os.system, f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused by torch.load"):
        read_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()
