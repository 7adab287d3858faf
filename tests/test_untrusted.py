"""Artifacts from elsewhere run no code (issue 10): crafted .pt2 archives are refused before
torch unpickles anything in them, AOTInductor packages need trust_artifact, and a plain
torch.export program still loads."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli_here
from torch import nn

from effrun import artifacts
from effrun.errors import EffrunError
from effrun.untrusted import ALLOWED_GLOBALS, pickle_imports, scan_archive

SYSTEM = f"{os.system.__module__}.system"  # how a pickle names os.system (posix.system)
SAMPLE_INPUTS = "data/sample_inputs/model.pt"


class Evil:
    """Pickles as a call of os.system: unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, nn.Module, torch.Tensor]:
    """A real torch.export archive of a small module (path, module, an input)."""
    torch.manual_seed(0)
    module, x = Small().eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(torch.export.export(module, (x,)), path)
    return path, module, x


def rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> str:
    """Copy the archive `src` to `dst` with the members named (below its top folder) in
    `replace` given new bytes; returns the top folder's name."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            inner = info.filename.split("/", 1)[1]
            zout.writestr(info, replace.get(inner, zin.read(info)))
    return root


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def evil_archives(src: Path, tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """The crafted archives: {case: (path, the member the refusal must name)}."""
    out = {}
    # The file: the sample inputs member is a bare pickle calling os.system.
    path = tmp_path / "bare_pickle.pt2"
    root = rewrite(src, path, {SAMPLE_INPUTS: pickle.dumps(Evil(marker), protocol=2)})
    out["sample inputs: bare pickle"] = (path, f"{root}/{SAMPLE_INPUTS}")
    # The same, as torch writes it: a torch.save zip whose data.pkl holds the call.
    path = tmp_path / "torch_save.pt2"
    root = rewrite(src, path, {SAMPLE_INPUTS: torch_saved(Evil(marker))})
    out["sample inputs: torch.save zip"] = (path, f"{root}/{SAMPLE_INPUTS} -> ")
    # A weight declared as pickled (a tensor subclass would be), its pickle protocol 4
    # (STACK_GLOBAL, memoized strings).
    with zipfile.ZipFile(src) as z:
        config_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(config_name))
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    path = tmp_path / "weight.pt2"
    root = rewrite(src, path, {
        config_name.split("/", 1)[1]: json.dumps(config).encode(),
        f"data/weights/{entry['path_name']}": pickle.dumps(Evil(marker), protocol=4)})
    out["weight: protocol 4 pickle"] = (path, f"{root}/data/weights/{entry['path_name']}")
    return out


def test_evil_archives_run_code_when_trusted(exported, tmp_path):
    """The premise: torch.export.load runs the crafted pickles (so the tests below test
    something)."""
    for case, (path, _) in evil_archives(exported[0], tmp_path, tmp_path / "m").items():
        marker = tmp_path / "m"
        marker.unlink(missing_ok=True)
        with pytest.raises(Exception):  # noqa: B017 (it runs the code, then fails to load)
            artifacts.load_model(path, trusted=True)
        assert marker.exists(), f"{case}: the crafted archive ran no code"


@pytest.mark.parametrize("read", ["load_model", "read_meta"])
def test_evil_archives_are_refused_without_running(exported, tmp_path, read):
    marker = tmp_path / "marker"
    for case, (path, member) in evil_archives(exported[0], tmp_path, marker).items():
        with pytest.raises(EffrunError) as err:
            getattr(artifacts, read)(path)
        msg = str(err.value)
        assert "\n" not in msg
        assert f"{path}: member {member}" in msg and f"imports {SYSTEM}," in msg, (case, msg)
        assert "trust_artifact=true" in msg
        assert not marker.exists(), f"{case}: code ran"


def test_plain_export_passes_and_loads_untrusted(exported):
    path, module, x = exported
    scan_archive(path)
    model, meta = artifacts.load_model(path)  # trusted=False
    assert meta["deploy"]["precision"] == "int8"  # a .pt2 without effrun's metadata
    with torch.no_grad():
        assert torch.allclose(model(x), module(x))


def test_aoti_package_needs_trust(tmp_path, monkeypatch):
    path = tmp_path / "package.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/archive_format", "pt2")
        z.writestr("x/data/aotinductor/model/model.so", b"\x7fELF not really")
    for read in (artifacts.load_model, artifacts.read_meta):
        with pytest.raises(EffrunError, match="AOTInductor package .*x/data/aotinductor/"):
            read(path)
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda p: loaded.append(p) or nn.Identity())
    _, meta = artifacts.load_model(path, trusted=True)
    assert loaded == [str(path)] and meta["aoti_package"]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_imports_every_protocol(protocol, tmp_path):
    assert list(pickle_imports(pickle.dumps(Evil(tmp_path / "m"), protocol=protocol))) == [SYSTEM]


def test_pickle_imports_unnamed_globals():
    # STACK_GLOBAL whose operands are not the two strings pushed last: 'os' 'x' POP 'system'.
    computed = (b"\x80\x04\x8c\x02os\x94\x8c\x01x0\x8c\x06system\x93"
                b"\x8c\x04true\x85R.")
    pickletools.dis(computed, out=io.StringIO())  # a well-formed pickle
    assert list(pickle_imports(computed)) == ["<computed name>"]
    assert list(pickle_imports(b"\x80\x02\x82\x01)R.")) == ["<extension registry>"]
    assert list(pickle_imports(b"\x80\x02\xff")) == ["<unreadable pickle>"]
    assert list(pickle_imports(b'{"config": {}}')) == []  # JSON: not a pickle, imports nothing


def test_allowed_globals_are_torch_weights_only_globals():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert ALLOWED_GLOBALS <= set(_get_allowed_globals())


def test_cli_refuses_evil_init_from(exported, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path, member = evil_archives(exported[0], tmp_path, marker)["sample inputs: bare pickle"]
    r = run_cli_here(["+experiment=smoke", "stages=[benchmark]", f"init_from={path}",
                      f"hydra.run.dir={tmp_path / 'run'}"], REPO, monkeypatch)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if member in ln]
    assert len(lines) == 1 and SYSTEM in lines[0], r.stderr
    assert not marker.exists()
