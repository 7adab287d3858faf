"""Deployable int8 artifacts: a torch.export program (model.pt2) and an AOTInductor package.

model.pt2 is the converted graph, exported again with a dynamic batch dimension and only the
tensors it uses; it reloads with plain torch, no effrun or torchao:
    import torch, torch.ao.quantization.fx._decomposed  # defines the quantize/dequantize ops
    model = torch.export.load("model.pt2").module()
and runs fast once compiled with Inductor freezing on (plus `import torchao.quantization.pt2e.
quantizer.x86_inductor_quantizer`, which registers the x86 int8 fusion passes).
Its metadata rides inside the archive (extra file effrun.json). model_aoti.pt2 (optional) is a
compiled shared library that loads with `torch._inductor.aoti_load_package` and needs no
compiler at load time; whether Inductor fused the int8 kernels into it is checked and recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from effrun import artifacts
from effrun.compile import fused_int8_kernels
from effrun.compression.quantize.common import COMPILE_OPTIONS, Int8Model, export_program
from effrun.errors import EffrunError
from effrun.stage import Deployment
from effrun.untrusted import scan_archive

log = logging.getLogger("effrun")

FORMAT = "effrun.int8/1"
META_FILE = "effrun.json"
AOTI_FILE = "model_aoti.pt2"


def _no_meta() -> dict:
    """The metadata of a .pt2 that carries none (not written by effrun): int8, run as is."""
    return {"deploy": Deployment(precision="int8").to_meta()}


def save_int8(model: Int8Model, stage_dir: Path, meta: dict, example: torch.Tensor, *,
              aot_package: bool) -> Path:
    """Write model.pt2 (and model_aoti.pt2 with `aot_package`) into `stage_dir`.

    `meta` is the complete artifact metadata the pipeline hands to a saver (stage,
    model_config, num_classes, deploy, extra); it is stored as effrun.json inside the archive,
    with the format tag and the AOTInductor package's report. `example` is an input batch for
    export (its batch dimension is made dynamic)."""
    stage_dir = Path(stage_dir)
    meta = {"format": FORMAT, **meta}
    if aot_package:
        meta["aoti"] = build_aoti(export_program(model.gm, example), stage_dir / AOTI_FILE)
    path = stage_dir / "model.pt2"
    with artifacts.atomic_path(path) as tmp:
        torch.export.save(export_program(model.gm, example), tmp,
                          extra_files={META_FILE: json.dumps(meta, default=str)})
    return path


def build_aoti(ep: torch.export.ExportedProgram, path: Path) -> dict:
    """Compile an AOTInductor package; report whether its code calls fused int8 kernels."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 (fusion passes)

    with artifacts.atomic_path(path, suffix=".pt2") as tmp:  # AOTI wants a name ending in .pt2
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                 inductor_configs=dict(COMPILE_OPTIONS))
    with zipfile.ZipFile(path) as z:
        code = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist()
                         if n.endswith(".cpp"))
    fused = sorted(fused_int8_kernels(code))
    if not fused:
        log.warning("quantize: the AOTInductor package has no fused int8 kernel (this torch "
                    "does not apply the x86 int8 fusion ahead of time): it runs dequantize + "
                    "float ops; deploy model.pt2 with torch.compile for int8 speed")
    return {"file": path.name, "fused_int8_kernels": fused}


def is_aoti_package(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/data/aotinductor/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False  # not an archive: torch.export.load says so in one line


def load_int8(path: Path, *, trusted: bool = False) -> tuple[nn.Module, dict]:
    """ARTIFACT_LOADERS['.pt2']: a torch.export program or an AOTInductor package.

    `trusted`: the file was written by effrun in this run dir, or the user said they trust it
    (trust_artifact=true); it loads as it is. Otherwise it is scanned first
    (effrun.untrusted.scan_archive): a pickle that imports anything a plain torch.export
    program does not, or an AOTInductor package (a shared library), is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise EffrunError(f"model artifact not found: {path}")
    if not trusted:
        scan_archive(path)  # before anything, torchao included, touches the file
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 (fusion passes)

    if is_aoti_package(path):  # trusted: an untrusted one was refused by the scan
        sibling = path.with_name("model.pt2")
        meta = (load_int8(sibling, trusted=trusted)[1] if sibling.is_file() and sibling != path
                else _no_meta())
        # Already compiled ahead of time: it runs as it is, never through torch.compile.
        deploy = dataclasses.replace(Deployment.from_meta(meta), compile_options=None)
        meta = {**meta, "deploy": deploy.to_meta(), "aoti_package": True}
        return Int8Model(torch._inductor.aoti_load_package(str(path))), meta
    extra = {META_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as e:
        raise EffrunError(f"cannot load {path} as a torch.export program: "
                         f"{str(e).strip().splitlines()[0]}") from None
    # Archives written before the stage contract keep the deploy keys at the top level;
    # Deployment.from_meta reads both layouts.
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else _no_meta()
    return Int8Model(ep.module()), meta
