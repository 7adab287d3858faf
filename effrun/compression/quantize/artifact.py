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

import json
import logging
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from effrun import artifacts
from effrun.compression.quantize.common import (
    COMPILE_OPTIONS,
    FUSED_INT8_OP,
    MAX_BATCH,
    Int8Model,
    example_batch,
)

log = logging.getLogger("effrun")

FORMAT = "effrun.int8/1"
META_FILE = "effrun.json"
AOTI_FILE = "model_aoti.pt2"


def _export(gm: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(gm, (example,), dynamic_shapes=({0: batch},), strict=True)


def save_int8(model: Int8Model, stage_dir: Path, ctx, *, aot_package: bool) -> Path:
    example = example_batch(ctx.data)
    meta = {"format": FORMAT, "stage": ctx.stage, "precision": "int8",
            "model_config": dict(ctx.model_config), "num_classes": ctx.data.num_classes,
            "compile_options": COMPILE_OPTIONS, "expected_kernels": FUSED_INT8_OP.pattern,
            **ctx.artifact_extra}
    if aot_package:
        meta["aoti"] = build_aoti(_export(model.gm, example), stage_dir / AOTI_FILE)
    path = stage_dir / "model.pt2"
    with artifacts.atomic_path(path) as tmp:
        torch.export.save(_export(model.gm, example), tmp,
                          extra_files={META_FILE: json.dumps(meta, default=str)})
    return path


def build_aoti(ep: torch.export.ExportedProgram, path: Path) -> dict:
    """Compile an AOTInductor package; report whether its code calls fused int8 kernels."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 (fusion passes)

    tmp = path.with_name(f".{path.stem}.partial.pt2")  # AOTI wants a name ending in .pt2
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                 inductor_configs=dict(COMPILE_OPTIONS))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with zipfile.ZipFile(path) as z:
        code = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist()
                         if n.endswith(".cpp"))
    fused = sorted({op.removesuffix("_tensor") for op in FUSED_INT8_OP.findall(code)})
    if not fused:
        log.warning("quantize: the AOTInductor package has no fused int8 kernel (this torch "
                    "does not apply the x86 int8 fusion ahead of time): it runs dequantize + "
                    "float ops; deploy model.pt2 with torch.compile for int8 speed")
    return {"file": path.name, "fused_int8_kernels": fused}


def is_aoti_package(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any("/data/aotinductor/" in n for n in z.namelist())


def load_int8(path: Path) -> tuple[nn.Module, dict]:
    """ARTIFACT_LOADERS['.pt2']: a torch.export program or an AOTInductor package."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 (fusion passes)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model artifact not found: {path}")
    if is_aoti_package(path):
        sibling = path.with_name("model.pt2")
        meta = load_int8(sibling)[1] if sibling.is_file() and sibling != path else {}
        meta = {**meta, "compile_options": None, "aoti_package": True}
        return Int8Model(torch._inductor.aoti_load_package(str(path))), meta
    extra = {META_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as e:
        raise ValueError(f"cannot load {path} as a torch.export program: "
                         f"{str(e).strip().splitlines()[0]}") from None
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {"precision": "int8"}
    return Int8Model(ep.module()), meta
