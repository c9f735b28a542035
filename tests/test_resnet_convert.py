"""ResNet checkpoint conversion: files written in the anchors' exact formats (official training checkpoint of a
DataParallel model, timm attn_layer='cbam', plain torchvision-layout ResNets), both directions, strict loading
into the anchors' modules (`benchmarks/anchors_resnet.py`), list_cbam_blocks, refusal of pickled objects, the
CLI, and loading the converted file in JAX without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cbam_multi import CheckpointError, ResNetSpec, WeightsError, load_weights
from cbam_multi.models import resnet_convert as rc
from cbam_multi.torch.models import ResNet, export_model_weights, import_model_weights

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.anchors_resnet import official_resnet, timm_resnet_cbam

# The keys of the official ResidualNet's first Bottleneck with CBAM, written out from MODELS/model_resnet.py and
# MODELS/cbam.py (BatchNorm2d buffers included), as a DataParallel state_dict names them.
OFFICIAL_LAYER1_0 = [
    f"module.layer1.0.{k}"
    for k in [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
        "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked",
        "conv3.weight", "bn3.weight", "bn3.bias", "bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked",
        "downsample.0.weight", "downsample.1.weight", "downsample.1.bias", "downsample.1.running_mean",
        "downsample.1.running_var", "downsample.1.num_batches_tracked",
        "cbam.ChannelGate.mlp.1.weight", "cbam.ChannelGate.mlp.1.bias", "cbam.ChannelGate.mlp.3.weight",
        "cbam.ChannelGate.mlp.3.bias", "cbam.SpatialGate.spatial.conv.weight", "cbam.SpatialGate.spatial.bn.weight",
        "cbam.SpatialGate.spatial.bn.bias", "cbam.SpatialGate.spatial.bn.running_mean",
        "cbam.SpatialGate.spatial.bn.running_var", "cbam.SpatialGate.spatial.bn.num_batches_tracked",
    ]
]


def _randomise_bn(model, seed=0):
    """Non-trivial BN statistics and spatial-BN scales (the official init zeroes them), so that a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _official_file(path, network_type="CIFAR10", depth=18, classes=10):
    anchor = _randomise_bn(official_resnet(network_type, depth, classes, "CBAM"))
    state = torch.nn.DataParallel(anchor).state_dict()
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": state, "best_prec1": 77.6, "optimizer": optimizer}, path)
    return anchor


def test_official_checkpoint_to_our_torch_and_back(tmp_path):
    anchor = _official_file(tmp_path / "official.pth.tar")
    out = rc.convert(tmp_path / "official.pth.tar", tmp_path / "r18.safetensors", "official", "canonical")
    weights, spec = load_weights(tmp_path / "r18.safetensors")
    assert spec == ResNetSpec(18, "cifar", num_classes=10) == out["spec"]
    x = torch.randn(2, 3, 32, 32)
    ours = import_model_weights(ResNet(spec), weights).eval()
    with torch.no_grad():
        assert (ours(x) - anchor(x)).abs().max() < 1e-5
    # back: the official loader (strict, after stripping 'module.') accepts it and computes the same
    rc.convert(tmp_path / "r18.safetensors", tmp_path / "back.pth", "canonical", "official")
    ck = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(ck) == {"epoch", "arch", "state_dict", "best_prec1", "optimizer"}
    assert all(k.startswith("module.") for k in ck["state_dict"])
    fresh = official_resnet("CIFAR10", 18, 10, "CBAM").eval()
    fresh.load_state_dict({k[len("module."):]: v for k, v in ck["state_dict"].items()}, strict=True)
    with torch.no_grad():
        assert (fresh(x) - anchor(x)).abs().max() < 1e-5
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ck["optimizer"])  # the optimizer entry is a valid SGD state too


def test_official_export_key_set_is_exact():
    spec = ResNetSpec(50)
    ck = rc.official_checkpoint(export_model_weights(ResNet(ResNetSpec(50, num_classes=10), seed=0)), ResNetSpec(50, num_classes=10))
    keys = [k for k in ck["state_dict"] if k.startswith("module.layer1.0.")]
    assert sorted(keys) == sorted(OFFICIAL_LAYER1_0)
    anchor_keys = set(torch.nn.DataParallel(official_resnet("ImageNet", 50, 10, "CBAM")).state_dict())
    assert set(ck["state_dict"]) == anchor_keys
    assert spec.num_params() == sum(p.numel() for p in official_resnet("ImageNet", 50, 1000, "CBAM").parameters())


def test_timm_both_directions(tmp_path):
    anchor = _randomise_bn(timm_resnet_cbam(18, 10))
    weights, spec = rc.from_state_dict(anchor.state_dict(), "timm")
    assert spec.cbam_preset == "timm" and spec.depth == 18
    assert "layer1.0.se.channel.fc1.weight" in anchor.state_dict()
    x = torch.randn(2, 3, 64, 64)
    ours = import_model_weights(ResNet(spec), weights).eval()
    with torch.no_grad():
        assert (ours(x) - anchor(x)).abs().max() < 1e-5
    back = rc.to_state_dict(weights, spec, "timm")
    fresh = timm_resnet_cbam(18, 10).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        assert (fresh(x) - anchor(x)).abs().max() < 1e-5


def test_timm_light_resnet_reads_as_timm_light():
    """timm's ``attn_layer='lcbam'`` (LightCbamModule) has the CBAM keys of ``'cbam'`` with a one-map spatial
    kernel: the spec is inferred as preset timm_light (not a shape error), and it converts both ways."""
    anchor = _randomise_bn(timm_resnet_cbam(18, 10, light=True))
    weights, spec = rc.from_state_dict(anchor.state_dict(), "timm")
    assert spec == ResNetSpec(18, num_classes=10, cbam_preset="timm_light")
    x = torch.randn(2, 3, 64, 64)
    ours = import_model_weights(ResNet(spec), weights).eval()
    with torch.no_grad():
        assert (ours(x) - anchor(x)).abs().max() < 1e-5
    fresh = timm_resnet_cbam(18, 10, light=True).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in rc.to_state_dict(weights, spec, "timm").items()}, strict=True)
    with torch.no_grad():
        assert (fresh(x) - anchor(x)).abs().max() < 1e-5
    blocks = rc.list_cbam_blocks(anchor.state_dict())
    assert len(blocks) == 8 and {b["preset"] for b in blocks} == {"timm_light"}


def test_add_cbam_to_a_plain_resnet(tmp_path):
    plain = _randomise_bn(official_resnet("CIFAR10", 18, 10, None))  # torchvision key layout, no CBAM
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    weights, spec, initialised = rc.add_cbam(rc.read_state_dict(tmp_path / "plain.pth")[0], preset="official", seed=1)
    assert spec == ResNetSpec(18, "cifar", num_classes=10, cbam_preset="official")
    assert initialised == [n for n in spec.param_shapes() if ".cbam." in n]
    assert len(initialised) == 8 * 9  # 8 blocks x (4 MLP + conv + 4 BN)
    assert np.array_equal(weights["layer2.0.conv1.kernel"], plain.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    x = torch.randn(2, 3, 32, 32)
    ours = import_model_weights(ResNet(spec), weights).eval()
    with torch.no_grad():
        ya, yb = ours(x), plain(x)
    assert (ya - yb).abs().max() > 1e-3  # the CBAM blocks act (spatial gate 0.5 at start, channel gate random)
    report = rc.convert(tmp_path / "plain.pth", tmp_path / "cbam.safetensors", "torchvision", "canonical", add_cbam_preset="official")
    assert report["initialised"] == initialised
    with pytest.raises(WeightsError, match="no CBAM blocks"):
        rc.to_state_dict(weights, spec, "torchvision")


def test_list_cbam_blocks_in_every_format(tmp_path):
    _official_file(tmp_path / "o.pth")
    blocks = rc.list_cbam_blocks(tmp_path / "o.pth")
    assert [b["prefix"] for b in blocks[:3]] == ["layer1.0.cbam", "layer1.1.cbam", "layer2.0.cbam"] and len(blocks) == 8
    assert blocks[2] == {"prefix": "layer2.0.cbam", "format": "official", "channels": 128, "hidden": 8, "preset": "official"}
    timm_blocks = rc.list_cbam_blocks(timm_resnet_cbam(50, 10).state_dict())
    assert len(timm_blocks) == 16 and timm_blocks[-1]["prefix"] == "layer4.2.se" and timm_blocks[-1]["preset"] == "timm"
    spec = ResNetSpec(18, "cifar", num_classes=10, cbam_preset="paper")
    from cbam_multi import save_weights
    from cbam_multi.weights import init_weights

    save_weights(tmp_path / "c.safetensors", init_weights(spec), spec)
    canon = rc.list_cbam_blocks(tmp_path / "c.safetensors")
    assert canon[0]["format"] == "canonical" and canon[0]["preset"] == "paper" and canon[-1]["channels"] == 512
    assert rc.list_cbam_blocks(official_resnet("CIFAR10", 18, 10, None).state_dict()) == []


def test_errors_are_one_line_and_change_nothing(tmp_path):
    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "evil.pth")  # a pickled object
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        rc.read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        rc.read_state_dict(tmp_path / "bad.pth")
    sd = official_resnet("CIFAR10", 18, 10, "CBAM").state_dict()
    del sd["layer1.0.cbam.ChannelGate.mlp.1.weight"]
    with pytest.raises(WeightsError, match="missing"):
        rc.from_state_dict(sd, "official", spec=ResNetSpec(18, "cifar", num_classes=10))
    with pytest.raises(WeightsError, match="unknown checkpoint format"):
        rc.from_state_dict(sd, "keras")


def test_cli_convert_and_list(tmp_path, capsys):
    from cbam_multi.training.cli import main

    _official_file(tmp_path / "o.pth.tar")
    assert main(["convert", str(tmp_path / "o.pth.tar"), str(tmp_path / "o.safetensors"), "--from", "official", "--to", "canonical"]) == 0
    args = ["convert", str(tmp_path / "o.safetensors"), str(tmp_path / "t.safetensors"), "--from", "canonical", "--to", "official"]
    assert main(args) == 2
    assert "official" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "o.pth.tar"), "--list"]) == 0
    assert "layer4.1.cbam" in capsys.readouterr().out


def test_converted_file_loads_in_jax_without_torch(tmp_path):
    pytest.importorskip("flax")
    anchor = _official_file(tmp_path / "o.pth")
    rc.convert(tmp_path / "o.pth", tmp_path / "r.safetensors", "official", "canonical")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = anchor(torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", expected)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax.numpy as jnp
        from cbam_multi import load_weights
        from cbam_multi.jax.models import ResNet, import_model_weights
        weights, spec = load_weights({str(tmp_path / 'r.safetensors')!r})
        model = import_model_weights(ResNet(spec), weights)
        model.eval()
        y = np.asarray(model(jnp.asarray(np.load({str(tmp_path / 'x.npy')!r}).transpose(0, 2, 3, 1))))
        err = np.abs(y - np.load({str(tmp_path / 'y.npy')!r})).max()
        assert "torch" not in sys.modules or sys.modules["torch"] is None, "torch was imported"
        assert err < 1e-4, err
        print("ok", err)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
