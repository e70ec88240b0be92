"""Every registered architecture builds, runs forward and backward at a tiny size, and freezes
what its policy says."""
import pytest
import torch
import torch.nn as nn

from flannel.registry import ARCHITECTURES, build_model, freeze, get_arch, train_mode
from flannel.train.loop import training_loss

SMALL = ["resnet18", "densenet121", "squeezenet1_1", "mobilenet_v3_small"]
LARGE = sorted(set(ARCHITECTURES) - set(SMALL))


def _forward_backward(name: str, num_classes: int = 3) -> nn.Module:
    """Forward, the training loss (with inception_v3's auxiliary head), backward and one step."""
    torch.manual_seed(0)
    spec = get_arch(name)
    model = build_model(name, num_classes).train()
    side = max(64, spec.min_size)
    x, y = torch.randn(2, 3, side, side), torch.tensor([0, num_classes - 1])
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    assert logits.shape == (2, num_classes)
    head = model.get_submodule(spec.head)
    before = head.weight.detach().clone()
    loss = training_loss(model, nn.CrossEntropyLoss(), x, y)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    if name == "inception_v3":  # the auxiliary classifier is part of the training loss
        assert model.AuxLogits.fc.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, head.weight)
    return model


@pytest.mark.parametrize("name", SMALL)
def test_small_architectures_forward_backward(name):
    _forward_backward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_architectures_forward_backward(name):
    _forward_backward(name)


def test_registry_covers_the_reports_architectures():
    named = {"alexnet", "vgg19", "vgg19_bn", "resnet50", "resnet152", "resnext101_32x8d",
             "densenet161", "inception_v3", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0"}
    assert named <= set(ARCHITECTURES)
    assert get_arch("inception_v3").input_size == 299


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(KeyError, match="resnet18"):
        get_arch("resnet19")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_head_leaves_only_the_head_trainable():
    model = freeze(build_model("resnet18", 3), get_arch("resnet18"), "head")
    assert _trainable(model) == {"fc.weight", "fc.bias"}


def test_freeze_last_fraction_unfreezes_layer3_and_layer4_of_resnet50():
    # seed 004 fine-tuned ResNet50's layer3 and layer4 (about the last quarter of its groups).
    model = freeze(build_model("resnet50", 4), get_arch("resnet50"), "last:0.4")
    groups = {n.split(".")[0] for n in _trainable(model)}
    assert groups == {"layer3", "layer4", "fc"}


def test_freeze_none_trains_everything():
    model = freeze(build_model("squeezenet1_1", 3), get_arch("squeezenet1_1"), "none")
    assert all(p.requires_grad for p in model.parameters())


def test_local_weights_file_of_the_stock_model_loads_and_gets_a_new_head(tmp_path):
    import torchvision

    stock = torchvision.models.get_model("squeezenet1_1", weights=None)
    torch.save(stock.state_dict(), tmp_path / "sq.pth")
    model = build_model("squeezenet1_1", 3, weights=tmp_path / "sq.pth")
    assert torch.equal(model.features[0].weight, stock.features[0].weight)
    assert model.classifier[1].out_channels == 3


def test_pretrained_enum_path_resolves_the_url_and_loads_through_the_downloader():
    import torchvision

    seen = []

    def fake_download(url):
        seen.append(url)
        return torchvision.models.get_model("squeezenet1_1", weights=None).state_dict()

    model = build_model("squeezenet1_1", 3, weights="DEFAULT", download=fake_download)
    expected = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT.url
    assert seen == [expected] and expected.startswith("https://")
    assert model.classifier[1].out_channels == 3


def _bn_means(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("policy, frozen_bn, moving_bn", [
    ("head", "layer1.0.bn1", "layer4.1.bn2"),     # every BatchNorm frozen: none may move
    ("last:0.25", "layer1.0.bn1", "layer4.1.bn2"),  # layer4 trains: its BatchNorms move
    ("none", None, "layer1.0.bn1"),
])
def test_frozen_batchnorm_keeps_its_running_statistics(policy, frozen_bn, moving_bn):
    torch.manual_seed(0)
    spec = get_arch("resnet18")
    model = train_mode(freeze(build_model("resnet18", 3), spec, policy))
    before = _bn_means(model)
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = _bn_means(model)
    if frozen_bn:
        assert torch.equal(before[frozen_bn], after[frozen_bn])
        assert not model.get_submodule(frozen_bn).training
    if policy == "head":
        assert all(torch.equal(before[n], after[n]) for n in before)
    else:
        assert not torch.equal(before[moving_bn], after[moving_bn])
        assert model.get_submodule(moving_bn).training
