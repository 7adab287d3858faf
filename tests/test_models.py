"""Model zoo: every configs/model/*.yaml builds and runs; paper sizes; export; pruned reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import effrun
from effrun.measure import count_flops, count_params, set_threads
from effrun.models import (
    CifarResNet,
    MobileNetV2Cifar,
    ResNet18Cifar,
    TorchvisionModel,
    build_model,
    load_state_into,
    model_config_dict,
)
from effrun.schema import load_option

# The configs ship inside the package (the top-level configs/ links to effrun/configs).
MODEL_YAMLS = sorted((Path(effrun.__file__).parent / "configs" / "model").glob("*.yaml"))
NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's 2 cores are shared; one intra-op thread avoids contention stalls.
    with set_threads(1):
        yield


def config_from_yaml(path: Path):
    """The model option as Hydra composes it (schema + the YAML's values), instantiated."""
    return instantiate(load_option("model", path.stem))


def test_model_yamls_found():
    names = {path.stem for path in MODEL_YAMLS}
    expected = {"resnet20", "resnet32", "resnet56", "resnet18", "mobilenetv2", "torchvision"}
    assert expected <= names


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda path: path.stem)
def test_yaml_builds_and_runs(path):
    model = config_from_yaml(path).build(NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda path: path.stem)
def test_channels_last_bf16_autocast(path):
    model = config_from_yaml(path).build(NUM_CLASSES).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out.float()).all()


# Paper (He et al. 2016, Table 6) sizes use option-A (parameter-free) shortcuts; our option-B
# 1x1 projections add ~2.8k parameters (~1% for resnet20), well inside the 10% tolerance.
@pytest.mark.parametrize("depth, paper_params", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6)])
def test_cifar_resnet_param_counts_match_paper(depth, paper_params):
    params = count_params(CifarResNet(depth=depth).build(NUM_CLASSES))
    assert abs(params - paper_params) / paper_params < 0.10


def test_resnet56_flops_match_paper():
    # The paper's "125M FLOPs" are multiply-accumulates; FlopCounterMode counts 2 per MAC.
    flops = count_flops(CifarResNet(depth=56).build(NUM_CLASSES), (1, 3, 32, 32))
    assert abs(flops - 2 * 125e6) / (2 * 125e6) < 0.15


def test_resnet18_cifar_and_mobilenetv2_sizes():
    # Reference sizes of the common CIFAR ports (10 classes): 11.17M and 2.24M parameters.
    assert abs(count_params(ResNet18Cifar().build(10)) - 11.17e6) < 0.05e6
    assert abs(count_params(MobileNetV2Cifar().build(10)) - 2.24e6) < 0.05e6
    half = MobileNetV2Cifar(width_mult=0.5).build(10)
    assert count_params(half) < count_params(MobileNetV2Cifar().build(10))


def test_bad_depth_message():
    with pytest.raises(ValueError, match=r"model.depth must be 6n\+2 \(20, 32, 56, 110\), got 21"):
        CifarResNet(depth=21)


@pytest.mark.parametrize("cfg", [CifarResNet(depth=20), MobileNetV2Cifar()], ids=str)
def test_export_strict_dynamic_batch(cfg):
    model = cfg.build(NUM_CLASSES).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model, (torch.randn(2, 3, 32, 32),), strict=True, dynamic_shapes=({0: batch},)
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected)


def test_torch_compile_traces_resnet20():
    # aot_eager exercises Dynamo + AOTAutograd tracing without slow Inductor codegen.
    model = CifarResNet(depth=20).build(NUM_CLASSES).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_config_dict_round_trip():
    cfg = CifarResNet(depth=32, width=8)
    as_dict = model_config_dict(cfg)
    assert as_dict == {"_target_": "effrun.models.CifarResNet", "depth": 32, "width": 8}
    assert model_config_dict(MobileNetV2Cifar())["_target_"] == "effrun.models.MobileNetV2Cifar"
    original = cfg.build(NUM_CLASSES).eval()
    rebuilt = build_model(as_dict, NUM_CLASSES).eval()
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))
    # Dataclass instances and OmegaConf configs are accepted too.
    assert isinstance(build_model(cfg, NUM_CLASSES), nn.Module)
    assert isinstance(build_model(OmegaConf.create(as_dict), NUM_CLASSES), nn.Module)
    with pytest.raises(ValueError, match="unknown option"):
        build_model({**as_dict, "widht": 4}, NUM_CLASSES)


def test_in_channels():
    x = torch.randn(1, 1, 32, 32)
    for cfg in (CifarResNet(), MobileNetV2Cifar(width_mult=0.25), TorchvisionModel("resnet18")):
        assert cfg.build(7, in_channels=1).eval()(x).shape == (1, 7)


def test_torchvision_unknown_name():
    with pytest.raises(ValueError) as error:
        TorchvisionModel(name="resnet181")
    message = str(error.value)
    assert "resnet18" in message and "torchvision.models.list_models()" in message


def keep_out(conv: nn.Conv2d | nn.Linear, keep: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[keep].clone())
    if isinstance(conv, nn.Conv2d):
        conv.out_channels = len(keep)
        if conv.groups > 1:  # depthwise: one filter per channel
            conv.in_channels = conv.groups = len(keep)
    else:
        conv.out_features = len(keep)


def keep_in(layer: nn.Conv2d | nn.Linear, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = len(keep)
    else:
        layer.in_features = len(keep)


def keep_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    bn.weight = nn.Parameter(bn.weight.detach()[keep].clone())
    bn.bias = nn.Parameter(bn.bias.detach()[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def randomize_bn_stats(model: nn.Module) -> None:
    # Fresh BNs are identities; random stats make a wrong channel slice change the output.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))


def assert_pruned_reload_matches(cfg, pruned: nn.Module) -> nn.Module:
    state = copy.deepcopy(pruned.state_dict())
    reloaded = load_state_into(build_model(model_config_dict(cfg), NUM_CLASSES).eval(), state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x))
    assert not any(module.training for module in reloaded.modules())
    return reloaded


def test_load_state_into_resized_resnet20():
    cfg = CifarResNet(depth=20)
    pruned = cfg.build(NUM_CLASSES).eval()
    randomize_bn_stats(pruned)
    # Inside a block the conv1 -> bn1 -> conv2 channels are free to prune.
    for block, keep in ((pruned.layer1[0], 10), (pruned.layer3[2], 40)):
        channels = torch.randperm(block.conv1.out_channels)[:keep].sort().values
        keep_out(block.conv1, channels)
        keep_bn(block.bn1, channels)
        keep_in(block.conv2, channels)
    reloaded = assert_pruned_reload_matches(cfg, pruned)
    assert reloaded.layer1[0].conv1.out_channels == 10
    assert reloaded.layer3[2].conv2.in_channels == 40
    assert reloaded.layer3[2].bn1.num_features == 40


def test_load_state_into_resized_mobilenetv2_depthwise_and_linear():
    cfg = MobileNetV2Cifar(width_mult=0.5)
    pruned = cfg.build(NUM_CLASSES).eval()
    randomize_bn_stats(pruned)
    block = pruned.features[2].conv  # expand 1x1, BN, ReLU6, depthwise 3x3, BN, ReLU6, 1x1, BN
    channels = torch.arange(0, block[0].out_channels, 2)
    hidden = len(channels)
    keep_out(block[0], channels)
    keep_bn(block[1], channels)
    keep_out(block[3], channels)
    keep_bn(block[4], channels)
    keep_in(block[6], channels)
    head = pruned.features[-1]  # last 1x1 conv + BN feeding the Linear classifier
    channels = torch.arange(1000)
    keep_out(head[0], channels)
    keep_bn(head[1], channels)
    keep_in(pruned.classifier[1], channels)
    reloaded = assert_pruned_reload_matches(cfg, pruned)
    depthwise = reloaded.features[2].conv[3]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == hidden
    assert reloaded.classifier[1].in_features == 1000


@pytest.mark.parametrize("cfg", [CifarResNet(depth=20), MobileNetV2Cifar(width_mult=0.5)], ids=str)
def test_load_state_into_after_torch_pruning(cfg):
    tp = pytest.importorskip("torch_pruning")
    pruned = cfg.build(NUM_CLASSES).eval()
    classifier = pruned.fc if isinstance(cfg, CifarResNet) else pruned.classifier[1]
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        torch.randn(1, 3, 32, 32),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[classifier],
    )
    pruner.step()
    reloaded = assert_pruned_reload_matches(cfg, pruned)
    assert count_params(reloaded) < count_params(cfg.build(NUM_CLASSES)) * 0.5
