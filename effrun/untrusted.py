"""Checks an artifact effrun did not write in this run dir before anything in it is loaded.

A .pt2 (torch.export archive) holds pickles that `torch.export.load` unpickles without
restriction (sample inputs fall back to full unpickling, tensor subclasses and custom objects
always use it), and an AOTInductor package loads a shared library from inside the file: both
run whatever code the file's author put there. `scan_archive` reads such a zip without running
anything in it and refuses, in one line, a pickle that imports anything but what a torch.export
program of plain tensors needs (`ALLOWED_GLOBALS`), and any compiled code.

What is scanned: every member of the archive that torch may unpickle, i.e. every member except
the raw tensor payloads its own weights/constants configs declare (`data/weights/weight_N`,
`data/constants/tensor_N` with `use_pickle: false`: read as bytes, never unpickled); a member
that is itself a zip (a torch.save file such as `data/sample_inputs/<model>.pt`) is opened and
its members scanned the same way, its raw storages (`data/<N>`) aside. Text members (JSON, the
version files) are walked too: they are not pickles and import nothing. Globals are found by
walking the pickle opcodes (`pickletools.genops`), never by unpickling.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from effrun.errors import EffrunError

# What the pickles of a torch.export program of plain tensors import, found by listing the
# members of real archives (effrun's int8 model.pt2, torch.export.save of a small nn.Module):
# its sample inputs (a torch.save file) rebuild tensors from typed storages in an OrderedDict.
# The storage types of the other common dtypes are allowed too (sample inputs of an integer or
# half-precision model). All are in torch's own weights_only allow-list.
ALLOWED_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2",
    "collections.OrderedDict",
    *(f"torch.{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int",
                                    "Short", "Char", "Byte", "Bool")),
})

TRUST_HINT = "set trust_artifact=true if you trust this file"
AOTI_DIR = "data/aotinductor/"
SHARED_LIBRARY = (".so", ".dll", ".dylib", ".pyd")
# Members torch.export.load reads as raw bytes when its config says so (torch's own names).
_RAW_PAYLOAD = {"data/weights/": re.compile(r"weight_\d+"),
                "data/constants/": re.compile(r"tensor_\d+")}
_CONFIG = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")
_STORAGE = re.compile(r"data/\d+")  # a torch.save zip's raw tensor storages

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
            "SHORT_BINSTRING"}
_KEEPS_STACK = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_UNKNOWN = object()
_UNNAMED = {  # what pickle_imports yields for a global it cannot name
    "<computed name>": "imports a global whose name it computes (STACK_GLOBAL), which can run code",
    "<extension registry>": "imports a global through the pickle extension registry, which can "
                            "run code",
    "<unreadable pickle>": "is a pickle that cannot be read without running it",
}


def scan_archive(path: Path) -> None:
    """Refuse (EffrunError, one line) an archive that would run code when loaded: a pickle
    member importing a global outside ALLOWED_GLOBALS, compiled code (an AOTInductor package,
    a shared library), a TorchScript archive inside it, or a zip that torch and this check
    could read differently (member names that differ only in case). Nothing in it is run."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            _scan_zip(z, path, "", top=True)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EffrunError(f"cannot read {path} as a zip archive (.pt2): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _refuse(path: Path, member: str, what: str) -> EffrunError:
    return EffrunError(f"{path}: member {member} {what}; refusing to load it ({TRUST_HINT})")


def _scan_zip(z: zipfile.ZipFile, path: Path, prefix: str, *, top: bool) -> None:
    """Scan the members of `z` (the archive at `path`, or a zip inside it: then `prefix` names
    the member that holds it)."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    # torch's zip reader finds members case-insensitively: two names it could confuse would
    # make what is scanned and what is loaded differ.
    seen: set[str] = set()
    for n in names:
        if n.lower() in seen:
            raise _refuse(path, prefix + n, "appears twice in the archive")
        seen.add(n.lower())
    if not top and any(_inner(n) == "constants.pkl" for n in names):
        raise _refuse(path, prefix.removesuffix(" -> "),
                      "is a TorchScript archive, which torch.load runs as a program")
    raw = _raw_payloads(z, names) if top else set()
    for info in infos:
        name, inner = info.filename, _inner(info.filename)
        if f"/{AOTI_DIR}" in f"/{name}" or name.lower().endswith(SHARED_LIBRARY):
            raise EffrunError(f"{path} is an AOTInductor package or holds compiled code "
                              f"(member {prefix}{name}), which runs when it is loaded; "
                              f"refusing to load it ({TRUST_HINT})")
        if info.is_dir() or inner.lower() in raw or (not top and _STORAGE.fullmatch(inner)):
            continue
        data = z.read(info)
        if data[:4] == b"PK\x03\x04":
            try:
                nested = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                pass  # not a zip after all: scanned as a pickle below
            else:
                with nested:
                    _scan_zip(nested, path, f"{prefix}{name} -> ", top=False)
                continue
        for imported in pickle_imports(data):
            if imported not in ALLOWED_GLOBALS:
                raise _refuse(path, prefix + name, _UNNAMED.get(
                    imported, f"imports {imported}, which can run code"))


def _inner(name: str) -> str:
    """A member's path below the archive's top folder (torch's readers strip it)."""
    return name.split("/", 1)[1] if "/" in name else name


def _raw_payloads(z: zipfile.ZipFile, names: list[str]) -> set[str]:
    """Members (lower-case paths below the top folder) that torch.export.load reads only as
    raw tensor bytes: declared with `use_pickle: false` by a weights/constants config, under
    torch's own naming, and not named as a pickle by any config entry."""
    raw, pickled = set(), set()
    for name in names:
        if not _CONFIG.fullmatch(_inner(name)):
            continue
        try:
            entries = json.loads(z.read(name))["config"].values()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # torch cannot read it either; scan everything
        folder = _inner(name).rsplit("/", 1)[0] + "/"
        for e in entries:
            file = e.get("path_name") if isinstance(e, dict) else None
            if not isinstance(file, str):
                continue
            if (e.get("use_pickle") is False and e.get("tensor_meta") is not None
                    and _RAW_PAYLOAD[folder].fullmatch(file)):
                raw.add(f"{folder}{file}".lower())
            else:
                pickled.add(f"{folder}{file}".lower())
    return raw - pickled


def pickle_imports(data: bytes) -> Iterator[str]:
    """Every global the pickle(s) in `data` import, as "module.name", read from the opcodes
    without running anything. Consecutive pickles are read (torch's legacy format holds
    several). "<computed name>" stands for a STACK_GLOBAL whose operands are not plain strings,
    "<extension registry>" for an EXT opcode, "<unreadable pickle>" for a stream that starts
    like a pickle (the PROTO opcode) but cannot be read to its end. Bytes that are not a pickle
    (JSON, text) stop the walk at their first invalid opcode, as they would stop an unpickler."""
    f = io.BytesIO(data)
    while f.tell() < len(data):
        start = f.tell()
        stack: list = []  # the recent pushes: a string, or _UNKNOWN for anything else
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(f):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = arg.partition(" ")
                    yield f"{module}.{attr}"
                    stack.append(_UNKNOWN)
                elif name == "STACK_GLOBAL":
                    pair = stack[-2:]
                    known = len(pair) == 2 and all(isinstance(s, str) for s in pair)
                    yield ".".join(pair) if known else "<computed name>"
                    stack.append(_UNKNOWN)
                elif name.startswith("EXT"):
                    yield "<extension registry>"
                elif name in _STRINGS:
                    stack.append(arg if isinstance(arg, str) else _UNKNOWN)
                elif name in _GETS:
                    stack.append(memo.get(arg, _UNKNOWN))
                elif name == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else _UNKNOWN
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1] if stack else _UNKNOWN
                elif name not in _KEEPS_STACK:
                    stack.append(_UNKNOWN)
        except Exception:  # not (or no longer) a pickle: an unpickler stops here too
            if data[start:start + 1] == b"\x80":
                yield "<unreadable pickle>"
            return
        if f.tell() == start:
            return
