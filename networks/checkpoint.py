"""Loading published teacher weights without running code from the file.

An NVlabs EDM checkpoint (`edm-cifar10-32x32-uncond-vp.pkl`, …; T. Karras et al., arXiv:2206.00364v2, code
NVlabs/edm) is a plain pickle of {'ema': EDMPrecond, 'loss_fn', 'augment_pipe', 'dataset_kwargs'}. Every network
object in it is stored by NVlabs' `torch_utils.persistence` as a call `_reconstruct_persistent_obj(meta)`, where
meta = {type, version, module_src, class_name, state} and `module_src` is the *entire source file* of the class;
the normal unpickler `exec`s it. A pickle can also call any importable function.

`load_edm_pickle` reads such a file with a restricted unpickler: the persistence call becomes a stub
that keeps `meta` and never looks at `module_src`; a short allowlist of tensor-rebuilding and container globals
is served; any other global (`os.system`, `builtins.eval`, a class from the file's own code, …) is refused before
it is called, with an error that names it. Each tensor's storage is a nested blob in torch's legacy `torch.save`
layout, which a reader of its own parses (it serves nothing but the storage classes, so a blob can hold a storage
and nothing else) and shares without a copy. The weights are then read out of the object tree under the exact
`state_dict()` names, and our own SongUNet / DhariwalUNet is built from the recorded constructor arguments with its
random initialisation skipped, the stored tensors becoming its own (`load_state_dict(strict=True, assign=True)`,
every key and shape checked first). A full-size CIFAR-10 network loads about as fast as `torch.load` of the same
weights from a `.pt` (benchmarks/pkl_load.py).

`load_state_dict_file` reads a plain `.pt` state dict with `torch.load(weights_only=True)`, also fail-closed.
`load_teacher_into_student` copies a teacher's weights into a network built with `s_embedding=True`, checking that
the only keys it lacks are the s-input's (CTM's student initialisation, as in sony/ctm).

Every problem is raised as `CheckpointError` with the file's path and what is wrong with it.
"""
import dataclasses
import gc
import hashlib
import inspect
import io
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from networks.edm_unet import DhariwalUNet, SongUNet

NETWORK_CLASSES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------------
# The restricted unpickler

class _Persistent:
    """Stands in for one object of NVlabs' persistence layout. Holds `meta`; its `module_src` is never read."""

    def __init__(self, meta):
        self.meta = meta


class _Container:
    """Stands in for a plain torch.nn container (ModuleDict, ...), pickled by torch's ordinary reduction; keeps the
    pickled `__dict__` as `state` instead of building the real class."""

    def __setstate__(self, state):
        self.state = state


class _AttrDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict with attribute access), without importing dnnlib."""


# A tensor's storage inside a plain pickle is a nested blob in torch's legacy `torch.save` format (what
# `TypedStorage.__reduce__` writes): five pickles -- magic number, protocol version 1001, a sys_info dict, the
# object (here the storage itself, as a persistent id ('storage', <dtype>Storage, key, location, numel, view)),
# the list of storage keys -- then, per key, an int64 element count and the raw little-endian bytes. Such a plain
# storage record is read here by a parser of our own, without a copy, instead of one `torch.load` per tensor; it
# serves no global but the storage classes and calls nothing. Any other record (another object, a global, a
# different layout) goes to torch's own weights-only unpickler, exactly as strict as ever, only slower. A plain
# record always lands on the CPU, whatever device it was saved from.

# torch/serialization.py's MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in [
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool)]}


class _NotPlain(Exception):
    """A storage record that is not a plain storage: left to torch's weights-only unpickler."""


class _StorageRecordUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a storage class stands for its dtype, nothing callable
        raise _NotPlain

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _NotPlain
        return pid


def _storage_from_bytes(data: bytes):
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage record does not hold bytes")
    try:
        return _plain_storage(data)
    except _NotPlain:
        return torch.load(io.BytesIO(data), weights_only=True)


def _plain_storage(data: bytes):
    f = io.BytesIO(data)  # shares the buffer of `data` until written to: no copy
    unpickler = _StorageRecordUnpickler(f)
    try:
        magic, protocol, sys_info, pid, keys = (unpickler.load() for _ in range(5))  # five pickles in a row
    except _NotPlain:
        raise
    except Exception:  # noqa: BLE001 - malformed or truncated: let torch's reader say what is wrong
        raise _NotPlain from None
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict) or (
            sys_info.get("little_endian") is not True) or not isinstance(pid, tuple):
        raise _NotPlain
    _, dtype, key, location, numel, view = pid
    if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(location, str) or (
            type(numel) is not int or numel < 0) or keys != [key]:
        raise _NotPlain
    itemsize = torch._utils._element_size(dtype)
    start = f.tell() + 8
    if len(data) != start + numel * itemsize or int.from_bytes(data[start - 8:start], "little") != numel:
        raise _NotPlain
    if view is not None and not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
                                 and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
        raise _NotPlain
    with warnings.catch_warnings():
        # No copy: the storage shares the memory of `data`, which the unpickler created and nothing but the
        # storage will reference once loading returns, so writing to it is sound although Python calls bytes
        # immutable (which is all torch warns about here).
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        storage = torch.frombuffer(data, dtype=torch.uint8, offset=start).untyped_storage() if numel else (
            torch.UntypedStorage(0))
    if view is not None:  # (view key, offset, size) in elements: a slice of the root storage (old torch versions)
        storage = storage[view[1] * itemsize:(view[1] + view[2]) * itemsize]
    return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # What torch._utils._rebuild_tensor_v2 does for the one kind of tensor a network pickle holds: a dense view of
    # a storage. Anything else (hooks, tensor metadata, arguments of the wrong types) is refused.
    if not (isinstance(storage, torch.storage.TypedStorage) and type(storage_offset) is int and
            isinstance(size, tuple) and isinstance(stride, tuple) and all(type(n) is int for n in size + stride) and
            type(requires_grad) is bool and isinstance(backward_hooks, dict) and not backward_hooks and not metadata):
        raise pickle.UnpicklingError("refused tensor record: not a plain dense tensor")
    t = torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, storage_offset, size, stride)
    return t.requires_grad_(requires_grad)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not (isinstance(data, torch.Tensor) and type(requires_grad) is bool and isinstance(backward_hooks, dict) and
            not backward_hooks):
        raise pickle.UnpicklingError("refused parameter record: not a plain tensor")
    return nn.Parameter(data, requires_grad)


def _numpy_scalar(dtype, data):
    # EDM's constructors store a few numpy floats (e.g. skip_scale = np.sqrt(0.5)); rebuild them as Python
    # numbers. numpy's own reconstructor also accepts object dtypes, so it is not served directly.
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refused numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
    ("dnnlib.util", "EasyDict"): _AttrDict,
    ("torch.nn.modules.container", "ModuleDict"): _Container,
    ("torch.nn.modules.container", "ModuleList"): _Container,
    ("torch.nn.modules.container", "Sequential"): _Container,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of an EDM network pickle") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: not part of an EDM network pickle")


# --------------------------------------------------------------------------------------------------------------
# Reading the object tree

def _state(node, where: str) -> dict:
    state = node.meta.get("state") if isinstance(node, _Persistent) else getattr(node, "state", None)
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: object has no state dict")
    return state


def _mapping(state: dict, key: str, where: str) -> Mapping:
    value = state.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: {key} is a {type(value).__name__}, not a mapping")
    return value


def _flat_state_dict(node, prefix: str, where: str) -> dict:
    """The `state_dict()` of a pickled module tree: parameters, persistent buffers, then children, recursively."""
    state = _state(node, where)
    skip = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset)):
        raise CheckpointError(f"{where}: _non_persistent_buffers_set is a {type(skip).__name__}")
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, t in _mapping(state, group, where).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{where}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, child in _mapping(state, "_modules", where).items():
        if child is None:
            continue
        if not isinstance(child, (_Persistent, _Container)):
            raise CheckpointError(f"{where}: module {prefix}{name} is a {type(child).__name__}")
        out.update(_flat_state_dict(child, f"{prefix}{name}.", where))
    return out


def _check_persistent(node, class_names, where: str) -> dict:
    if not isinstance(node, _Persistent) or not isinstance(node.meta, dict):
        raise CheckpointError(f"{where}: not an object in NVlabs' persistence layout")
    meta = node.meta
    if meta.get("type") != "class" or meta.get("version") != 6:
        raise CheckpointError(f"{where}: persistence record of type {meta.get('type')!r}, version "
                              f"{meta.get('version')!r}; only type 'class', version 6 (NVlabs/edm) is understood")
    if meta.get("class_name") not in class_names:
        raise CheckpointError(f"{where}: holds a {meta.get('class_name')!r}, expected one of {sorted(class_names)}")
    return _state(node, where)


@dataclasses.dataclass
class EDMCheckpoint:
    """What an EDM pickle holds, in our terms.

    net: our SongUNet or DhariwalUNet with the EMA weights, in eval mode with requires_grad off, as stored.
    net_kwargs: its constructor arguments (EDM's names), so `type(net)(**net_kwargs)` rebuilds it; add
        `s_embedding=True` for a CTM student.
    precond: EDMPrecond's settings (sigma_data, sigma_min, sigma_max, use_fp16, img_resolution, img_channels,
        label_dim); c_skip, c_out, c_in, c_noise themselves are `algorithms/edm.py`'s.
    """
    net: nn.Module
    net_kwargs: dict
    precond: dict


def _unpickle(path: Path):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{path}: a zip archive (torch.save format), not an EDM .pkl; for a state dict "
                                  f"use networks.checkpoint.load_state_dict_file")
        if not head.startswith(b"\x80"):
            raise CheckpointError(f"{path}: not a pickle (it starts with {head!r})")
        f.seek(0)
        return _load_restricted(f, path)


def _load_restricted(f, path: Path):
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the tens of thousands of small objects would trigger collections that find nothing to free
    try:
        return _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated (the pickle ends before its STOP opcode)") from None
    except Exception as e:  # malformed opcodes or arguments surface as many exception types
        raise CheckpointError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None
    finally:
        if gc_was_enabled:
            gc.enable()


def _network_kwargs(cls, state: dict, where: str) -> dict:
    args, kwargs = state.get("_init_args", ()), state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: the network's constructor arguments (_init_kwargs) are missing")
    accepted = set(inspect.signature(cls).parameters) - {"s_embedding"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise CheckpointError(f"{where}: {cls.__name__} arguments {unknown} are not supported by networks/edm_unet.py")
    return dict(kwargs)


_INIT_OPS = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.mul_, torch.Tensor.zero_, torch.Tensor.fill_,
             torch.Tensor.copy_}


class _SkipInitialisation(torch.overrides.TorchFunctionMode):
    """Skips the in-place fills and scalings of nn.Parameters (ours and torch.nn.init's, which torch's own layers
    use), which is all a network's random initialisation does
    (seconds for a full-size network) and what stored weights replace anyway. The parameters keep the memory
    `torch.empty` gave them, never touched and freed when they are replaced. (The meta device would avoid the
    allocation too, but torch's meta versions of `normal_` and `outer` import about four seconds of compiler
    machinery on their first use.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else next(iter(kwargs.values()), None)  # torch.nn.init passes `tensor=` by name
        if type(target) is nn.Parameter and (func in _INIT_OPS or getattr(func, "__module__", "") == "torch.nn.init"):
            return target
        return func(*args, **kwargs)


def load_edm_pickle(path) -> EDMCheckpoint:
    """Read an NVlabs EDM `.pkl` without executing anything from it; return our network with its EMA weights.

    Only EDMPrecond checkpoints are accepted (`edm-*.pkl`): the `baseline-*` ones use VP/VE preconditioning, whose
    networks expect a different c_noise than EDM's ln(σ)/4, which every network here is called with.
    """
    path = Path(path)
    data = _unpickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not an EDM network pickle (expected a dict with 'ema', found {found})")
    ema = data["ema"]
    if isinstance(ema, _Persistent) and isinstance(ema.meta, dict) and ema.meta.get("class_name") in (
            "VPPrecond", "VEPrecond", "iDDPMPrecond"):
        raise CheckpointError(f"{path}: holds a {ema.meta['class_name']} network (an EDM baseline); only "
                              f"EDMPrecond checkpoints match the c_noise = ln(σ)/4 these networks are called with")
    pre = _check_persistent(ema, {"EDMPrecond"}, f"{path}: 'ema'")
    model = _mapping(pre, "_modules", f"{path}: 'ema'").get("model")
    where = f"{path}: 'ema.model'"
    state = _check_persistent(model, set(NETWORK_CLASSES), where)
    cls = NETWORK_CLASSES[model.meta["class_name"]]
    kwargs = _network_kwargs(cls, state, where)
    state_dict = _flat_state_dict(model, "", where)

    try:
        # No initialisation, and the stored tensors become the network's own below (assign): no copy either.
        with _SkipInitialisation():
            net = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build {cls.__name__}(**{kwargs}): {e}") from None
    _load_strict(net, state_dict, where, assign=True)
    precond = {k: pre[k] for k in ("sigma_data", "sigma_min", "sigma_max", "use_fp16", "img_resolution",
                                   "img_channels", "label_dim") if k in pre}
    return EDMCheckpoint(net.eval().requires_grad_(False), kwargs, precond)


# --------------------------------------------------------------------------------------------------------------
# Plain state dicts and teacher -> student

def _load_strict(net: nn.Module, state_dict: Mapping, where: str, assign: bool = False) -> None:
    """Load with every key and shape checked first. With `assign`, the tensors themselves become the network's,
    cast to the dtype the network declares, and every parameter is checked to hold loaded memory (for a network
    constructed without initialisation)."""
    own = net.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in state_dict.items()
             if k in expected and tuple(v.shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: does not match {type(net).__name__}: {len(missing)} missing keys "
                              f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} of wrong "
                              f"shape {wrong[:5]}")
    if assign:
        state_dict = {k: v.to(own[k].dtype) for k, v in state_dict.items()}
    net.load_state_dict(state_dict, strict=True, assign=assign)
    if assign:
        loaded = {v.data_ptr() for v in state_dict.values()}
        left = [k for k, p in net.named_parameters() if p.numel() and p.data_ptr() not in loaded]
        if left:  # cannot happen after a strict load of a state dict that lists every parameter
            raise CheckpointError(f"{where}: {type(net).__name__} parameters {left[:5]} were not loaded")


def read_state_dict_file(path) -> dict:
    """A `.pt` file holding a flat {name: tensor} dict, read with torch.load(weights_only=True). A leading
    `model.` on every key (an EDMPrecond's state_dict, or algorithms/edm.py's Denoiser) is removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), so it holds more than tensors "
                              f"(an EDM .pkl? use load_edm_pickle): {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch.save file, truncated or foreign "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a flat state dict of tensors")
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path, net: nn.Module) -> nn.Module:
    """Load a plain `.pt` state dict into `net` with strict key and shape checks; returns `net`."""
    _load_strict(net, read_state_dict_file(path), str(path))
    return net


def is_s_key(key: str) -> bool:
    """Whether a state_dict key belongs to CTM's s-input: every such module or parameter name ends in `_s`."""
    return any(part.endswith("_s") for part in key.split("."))


def load_teacher_into_student(student: nn.Module, teacher) -> None:
    """Copy a teacher's weights (a module or its state_dict) into a student built with `s_embedding=True`.

    Every key of the teacher must exist in the student with the same shape; the student may lack none but its
    s-input keys, which keep their initialisation. In the UNets the per-block `affine_s` is zero there, so the
    student then computes exactly the teacher's function for every s.
    """
    state = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
    expected = student.state_dict()
    missing = [k for k in expected if k not in state and not is_s_key(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"teacher -> {type(student).__name__}: missing non-s keys {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, wrong shapes {wrong[:5]} (build the student with the teacher's "
                              f"constructor arguments plus s_embedding=True)")
    student.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints written by train.py, and teachers of either kind

def network_classes():
    """Every network a checkpoint may name, by class name (imported here, not at module level, to keep the
    importer of published pickles free of the U-ViT and MLP modules)."""
    from networks.mlp import MLP
    from networks.uvit import UViT
    return {**NETWORK_CLASSES, "UViT": UViT, "MLP": MLP}


def build_network(spec, where="network"):
    """A network from a record {"cls": name, "kwargs": {...}}, with random weights (the caller loads them)."""
    classes = network_classes()
    if not isinstance(spec, Mapping) or spec.get("cls") not in classes or not isinstance(spec.get("kwargs"), Mapping):
        raise CheckpointError(f"{where}: not a network record of this project ({spec!r:.200})")
    try:
        return classes[spec["cls"]](**spec["kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build {spec['cls']}(**{dict(spec['kwargs'])}): {e}") from None


def read_run_checkpoint(path) -> dict:
    """A checkpoint written by train.py: a file `ckpt-*.pt`, or a run folder (its newest checkpoint), read with
    torch.load(weights_only=True). It must hold the `model` record (network, algorithm, data) and the weights."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("ckpt-*.pt")) or sorted(path.glob("S*/ckpt-*.pt"))
        if not found:
            raise CheckpointError(f"{path}: a folder without checkpoints (ckpt-*.pt)")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save (it starts with {head!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or hostile: all mean "not usable"
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "ema" not in state:
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a checkpoint of train.py (expected 'model' and 'ema', found {found})")
    state["path"] = str(path)
    return state


@dataclasses.dataclass
class Teacher:
    """A teacher network with what is known about it: the raw network F (eval mode, frozen), its record for
    building a student of the same architecture, the data it was trained on (None for a published pickle) and
    whether its published configuration runs it in fp16."""
    net: nn.Module
    spec: dict
    data: dict | None
    use_fp16: bool = False


def load_teacher(path, data=None, by_name=False) -> Teacher:
    """A teacher from an NVlabs EDM `.pkl` (read without executing it) or from a train.py `--algo edm` run; with
    `data` (a record {name, shape, label_dim}), CheckpointError unless it can teach on it (`teacher_mismatch`)."""
    if str(path).endswith(".pkl"):
        published = load_edm_pickle(path)
        spec = {"cls": type(published.net).__name__, "kwargs": published.net_kwargs}
        teacher = Teacher(published.net, spec, None, bool(published.precond.get("use_fp16", False)))
    else:
        state = read_run_checkpoint(path)
        model = state["model"]
        if model.get("algo") != "edm":
            raise CheckpointError(f"{path}: a {model.get('algo')} student, not an EDM teacher (train one with "
                                  f"--algo edm)")
        net = build_network(model["network"], str(path))
        _load_strict(net, state["ema"], state["path"])
        teacher = Teacher(net.eval().requires_grad_(False), model["network"], model["data"])
    if data is not None and (why := teacher_mismatch(teacher, data, by_name)):
        raise CheckpointError(why)
    return teacher


def teacher_mismatch(teacher: Teacher, data: dict, by_name: bool) -> str | None:
    """Why `teacher` cannot teach on `data` (a record {name, shape, label_dim}), or None. A teacher of ours must
    have been trained on data of the same shape (and, `by_name`, the same named data set: toys, digits); a
    published one must match the data's resolution, channels and classes."""
    kw, td = teacher.spec["kwargs"], teacher.data
    if td is not None and (td["shape"] != data["shape"] or by_name and td["name"] != data["name"]):
        return f"trained on {td['name']!r} {td['shape']}, but --data is {data['name']!r} {data['shape']}"
    if td is None and [kw.get("in_channels"), kw.get("img_resolution")] != data["shape"][:2]:
        r, c = kw.get("img_resolution"), kw.get("in_channels")
        return f"a {r}x{r}x{c} network, but the data is {data['shape'][1]}x{data['shape'][2]}x{data['shape'][0]}"
    if (kw.get("label_dim") or 0) != data["label_dim"]:
        return (f"label_dim {kw.get('label_dim') or 0}, but the run has {data['label_dim']} classes "
                f"({'add' if kw.get('label_dim') else 'drop'} --cond)")
    return None


def architectures():
    """Every named image architecture: name -> (class name, constructor arguments)."""
    from networks import edm_unet, uvit
    return {**{k: ("SongUNet", v) for k, v in edm_unet.SONGUNET_CONFIGS.items()},
            **{k: ("DhariwalUNet", v) for k, v in edm_unet.DHARIWALUNET_CONFIGS.items()},
            **{k: ("UViT", v) for k, v in uvit.UVIT_CONFIGS.items()}}


def student_spec(teacher: Teacher | None, arch: str | None, data: dict, dropout, s_embedding: bool) -> dict:
    """The record {cls, kwargs} of a student network: the teacher's architecture, else the 2D MLP for flat data,
    else the named image architecture fitted to the data's channels and classes; with the student's dropout (None:
    the architecture's own) and, for CTM, the s-input."""
    if teacher is not None:
        cls, kwargs = teacher.spec["cls"], dict(teacher.spec["kwargs"])
    elif len(data["shape"]) == 1:
        cls, kwargs = "MLP", dict(dim=data["shape"][0], label_dim=data["label_dim"])
    else:
        cls, kwargs = architectures()[arch]
        c = data["shape"][0]
        kwargs = {**kwargs, "label_dim": data["label_dim"],
                  **(dict(img_channels=c) if cls == "UViT" else dict(in_channels=c, out_channels=c))}
    if dropout is not None and "dropout" in inspect.signature(network_classes()[cls]).parameters:
        kwargs["dropout"] = dropout
    return dict(cls=cls, kwargs={**kwargs, "s_embedding": s_embedding})


# ---- Analytic-Precond statistics in a file of their own, tied to the teacher they were computed for -------------

def teacher_fingerprint(teacher, x0=None, labels=None) -> dict:
    """A network teacher: the SHA-256 of its state_dict (names, dtypes, shapes, bytes), the same on every device and
    under TF32. A teacher without state (an exact float64 denoiser): its outputs at float64 probe inputs made from
    the data x0 (and labels)."""
    state = teacher.state_dict() if isinstance(teacher, nn.Module) else {}
    if state:
        h = hashlib.sha256()
        for name, p in state.items():
            p = p.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{p.dtype}|{tuple(state[name].shape)}|".encode())
            h.update(p.view(torch.uint8).numpy().tobytes())
        return {"sha256": h.hexdigest()}
    x0 = x0[:4]
    x = x0.double().cpu() + torch.linspace(-1.0, 1.0, x0.numel(), dtype=torch.float64).reshape(x0.shape)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)[: x0.shape[0]]
    labels = None if labels is None else labels[:4].double().cpu()
    with torch.no_grad():
        D = teacher(x.to(x0.device), sigma.to(x0.device), None if labels is None else labels.to(x0.device))
    return {"x": x, "sigma": sigma, "labels": labels, "D": D.double().cpu()}


def save_analytic_stats(stats, path, teacher=None, x0=None, labels=None) -> None:
    """`analytic_precond.Stats` as plain tensors, floats and strings (readable with weights_only=True), with the
    fingerprint of `teacher` if given (x0, labels: the probes for a teacher without state). Atomic: a temporary
    file, then os.replace, so a kill leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"lam": stats.lam.cpu(), "ell": stats.ell.cpu(), "kappa": stats.kappa.cpu(),
                "sigma_data": stats.sigma_data,
                "fingerprint": None if teacher is None else teacher_fingerprint(teacher, x0, labels)}, tmp)
    os.replace(tmp, path)


def load_analytic_stats(path, teacher=None, device="cpu"):
    """Inverse of `save_analytic_stats`. With `teacher` (running on `device`), raise ValueError unless the file
    was saved with the fingerprint of this teacher."""
    from algorithms import analytic_precond
    d = torch.load(path, weights_only=True)
    stats, fp = analytic_precond.Stats(d["lam"], d["ell"], d["kappa"], d["sigma_data"]), d.get("fingerprint")
    if teacher is None or fp is None:
        return stats
    if "sha256" in fp:
        same = teacher_fingerprint(teacher) == {"sha256": fp["sha256"]}
    else:
        to = lambda v: None if v is None else v.to(device)
        with torch.no_grad():
            D = teacher(to(fp["x"]), to(fp["sigma"]), to(fp["labels"])).double().cpu()
        # An exact teacher computes in float64 on any device: devices differ by rounding (~1e-15 relative), while
        # any other data set moves the outputs at these probes by far more than 1e-9.
        same = D.shape == fp["D"].shape and torch.allclose(D, fp["D"], rtol=1e-9, atol=1e-12)
    if not same:
        raise ValueError(f"{path}: these Analytic-Precond statistics were computed for a different teacher; delete "
                         f"the file to recompute them for this one")
    return stats
