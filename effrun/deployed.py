"""A model made ready to run as it is deployed, on each runtime the benchmark times.

torch: `deploy_model` gives the eager form and every timed variant ("eager", and "compiled" with
hardware.compile or when the artifact's `Deployment` gives compile options), in the run's
autocast precision and memory format for float models; an int8 graph carries its own numerics.
onnxruntime / openvino: `RuntimeFiles` gives the model file each runtime loads (a float model's
ONNX / OpenVINO IR export, written by the stage with `export=[...]` or here on first use; an int8
artifact made for that runtime as it is) and one loaded session per thread count
(effrun/backends.py). How an artifact runs is read only from its `Deployment` (effrun/stage.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from effrun import backends, export
from effrun.artifacts import load_model
from effrun.compile import INFERENCE_OPTIONS, Compiled, compile_and_list_kernels
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.stage import Deployment

log = logging.getLogger("effrun")


class Inference(nn.Module):
    """A model as deployed: eval mode, the run's autocast precision, no autograd."""

    def __init__(self, model: nn.Module, hw: Hardware, autocast: bool = True):
        super().__init__()
        self.model = model
        # Resolved here, not in forward: under torch.compile, asking the hardware (which reads
        # /proc/cpuinfo for `auto` precision) would be traced on every compilation.
        self.device_type = hw.torch_device.type
        self.dtype = hw.autocast_dtype if autocast else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x)


@dataclass
class Deployed:
    """A torch model made ready to run as its `Deployment` says: the eager form and every timed
    variant ("eager", and "compiled" when hardware.compile or the deployment asks for it)."""

    deploy: Deployment
    hw: Hardware  # the run's hardware, on the device the deployment asks for
    eager: Inference
    variants: dict[str, nn.Module]

    @property
    def scored(self) -> nn.Module:
        """The form accuracy is scored on: an artifact that must be compiled to run as intended
        (int8) is scored compiled (its eager form runs slow reference kernels with slightly
        different rounding)."""
        return self.variants["compiled"] if self.deploy.compile_options is not None else self.eager

    @property
    def deployed_mode(self) -> str:
        """The variant a user deploys, which the "not faster" check judges: compiled when it
        was compiled, else eager."""
        return "compiled" if "compiled" in self.variants else "eager"

    def example(self, x: torch.Tensor) -> torch.Tensor:
        """An input as this model is fed: float models in the run's memory format."""
        x = x.to(self.hw.torch_device)
        return x if self.deploy.native else x.contiguous(memory_format=self.hw.memory_format)


def deployed_hardware(hw: Hardware, deploy: Deployment) -> Hardware:
    """The run's hardware, moved to the device the deployment must run on (x86 int8: the CPU,
    also when the run trained on a GPU)."""
    if deploy.device is None or deploy.device == hw.device:
        return hw
    return dataclasses.replace(hw, device=deploy.device)


def deploy_model(model: nn.Module, deploy: Deployment, hw: Hardware) -> Deployed:
    """Float models run as the run trains them (autocast precision, memory format); a native
    one (int8) carries its own numerics and runs as it is, on the run's device."""
    model = model.to(hw.torch_device) if deploy.native else hw.prepare(model)
    model.eval()
    eager = Inference(model, hw, autocast=not deploy.native)
    if deploy.compile_options is not None:
        # Deployed compiled only (int8: eager runs reference q/dq kernels no user deploys), so
        # only the compiled form is timed and judged.
        return Deployed(deploy, hw, eager,
                        {"compiled": Compiled(eager, deploy.compile_options, dynamic=False)})
    variants: dict[str, nn.Module] = {"eager": eager}
    if hw.compile:  # compiled as a user deploys it: for inference, freezing on
        variants["compiled"] = Compiled(eager, INFERENCE_OPTIONS, dynamic=False)
    return Deployed(deploy, hw, eager, variants)


def load_reference(deploy: Deployment, hw: Hardware) -> tuple[nn.Module, Deployed] | None:
    """The artifact this one is compared against (its model and its torch deployment, compiled
    with the same Inductor settings), or None."""
    path = deploy.compare_to
    if not path:
        return None
    if not Path(path).exists():
        log.warning("benchmark: reference artifact %s is gone; no comparison", path)
        return None
    ref_model, ref_meta = load_model(Path(path))  # named by the artifact's metadata: scanned
    ref_deploy = dataclasses.replace(Deployment.from_meta(ref_meta),
                                     compile_options=deploy.compile_options)
    return ref_model, deploy_model(copy.deepcopy(ref_model), ref_deploy, hw)


def eval_hardware(target: Deployed, hw: Hardware) -> Hardware:
    """How inputs are fed: a native model takes them as they come (contiguous)."""
    return dataclasses.replace(hw, channels_last=False) if target.deploy.native else hw


def expected_kernels(target: Deployed, batch: int, image_size, flags: list[str]
                     ) -> list[str] | None:
    """The fused kernels the compiled form calls, when its deployment expects some (None when
    it does not, or when nothing is compiled). Compiles at the evaluation batch shape, which
    scoring then reuses; an empty list is flagged."""
    pattern = target.deploy.expected_kernels
    if "compiled" not in target.variants or not pattern:
        return None
    example = torch.randn((batch, 3, *image_size), device=target.hw.torch_device)
    found = sorted(compile_and_list_kernels(target.variants["compiled"], example))
    if not found:
        flags.append(f"the compiled graph has none of the expected fused kernels ({pattern}): "
                     f"it runs unfused reference ops")
    return found


def score_batch(target: Deployed, data, config) -> int:
    """The evaluation batch: a model that must be compiled is scored at the largest benchmarked
    batch (short last batch padded), so scoring and timing share one compiled graph."""
    if target.deploy.compile_options is not None:
        return max(config.run.benchmark.batch_sizes)
    return min(config.run.train.eval_batch_size, len(data.test_y))


def score(target: Deployed, data, config) -> float:
    """Top-1 on the test split, as deployed (see `Deployed.scored`)."""
    result = evaluate(target.scored, data.test_x, data.test_y, data,
                      eval_hardware(target, target.hw), tta=config.run.train.tta,
                      batch_size=score_batch(target, data, config),
                      pad_last=target.deploy.compile_options is not None)
    return result["accuracy"]


@dataclass
class RuntimeFiles:
    """The files onnxruntime and openvino run for the run's models, and their sessions.

    A float model runs from its stage's export (model_fp32.onnx; model_openvino.xml for
    openvino) or, when the stage did not export, from an ONNX file written once into
    `export_dir` (the benchmark stage's dir); an artifact made for one runtime runs only there;
    a torch int8 graph runs on torch only."""

    export_dir: Path
    input_shape: tuple[int, ...]  # one image (C, H, W)
    exported: dict[str, Path | None] = field(default_factory=dict)  # artifact -> its ONNX
    sessions: dict[tuple, backends.BackendModel] = field(default_factory=dict)

    def file_for(self, artifact: Path, model: nn.Module, deploy: Deployment, backend: str
                 ) -> Path | None:
        """The file `backend` runs for this artifact, or None where it cannot run it."""
        if deploy.backend is not None:
            return Path(artifact) if deploy.backend == backend else None
        if deploy.native:
            return None  # a torch int8 graph: torch only
        stage_dir = Path(artifact).parent
        if backend == "openvino" and (stage_dir / export.OPENVINO_FILE).is_file():
            return stage_dir / export.OPENVINO_FILE
        if (stage_dir / export.ONNX_FILE).is_file():
            return stage_dir / export.ONNX_FILE  # openvino reads ONNX as well
        return self._export(Path(artifact), model)

    def _export(self, artifact: Path, model: nn.Module) -> Path | None:
        key = str(artifact)
        if key not in self.exported:
            path = self.export_dir / f"{artifact.parent.name}_{export.ONNX_FILE}"
            self.export_dir.mkdir(parents=True, exist_ok=True)
            try:
                float_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
                export.export_onnx(float_model, torch.randn(2, *self.input_shape), path)
                self.exported[key] = path
            except Exception as e:  # the exporter raises many kinds; the others still run
                log.warning("benchmark: %s not exported to ONNX (%s): not timed on "
                            "onnxruntime/openvino", artifact, export.root_cause(e))
                self.exported[key] = None
        return self.exported[key]

    def session(self, path: Path, backend: str, threads: int) -> backends.BackendModel:
        key = (str(path), backend, threads)
        if key not in self.sessions:
            self.sessions[key] = backends.load(path, backend, threads)
        return self.sessions[key]
