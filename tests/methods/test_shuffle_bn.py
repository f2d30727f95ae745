from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from methods.shuffle_bn import SplitBatchNorm2d, batch_shuffle, batch_unshuffle, convert_split_bn

EPS = 1e-5
MOMENTUM = 0.1


def _split_bn(c: int = 3, s: int = 3) -> SplitBatchNorm2d:
    bn = SplitBatchNorm2d(c, num_splits=s, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    return bn


def test_unshuffle_restores_order_in_one_process() -> None:
    torch.manual_seed(0)
    x = torch.arange(16.0).view(8, 2)
    shuffled, idx_unshuffle = batch_shuffle(x)
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(shuffled.sort(dim=0).values, x, rtol=0, atol=0)
    torch.testing.assert_close(batch_unshuffle(shuffled, idx_unshuffle), x, rtol=0, atol=0)


def test_split_bn_train_normalises_groups_i_mod_s() -> None:
    torch.manual_seed(0)
    n, c, s = 12, 3, 3
    x = torch.randn(n, c, 4, 5) * 3 + 1
    x.requires_grad_(True)
    bn = _split_bn(c, s)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    out = bn(x)

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = bn.weight.detach().clone().requires_grad_(True)
    b_ref = bn.bias.detach().clone().requires_grad_(True)
    expected = torch.empty_like(x_ref)
    means, unbiased_vars = [], []
    for g in range(s):
        xg = x_ref[g::s]  # sample i falls in group i % s
        mean = xg.mean(dim=(0, 2, 3))
        var = ((xg - mean.view(1, c, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        m = xg.numel() // c
        means.append(mean.detach())
        unbiased_vars.append(var.detach() * m / (m - 1))
        normed = (xg - mean.view(1, c, 1, 1)) / torch.sqrt(var.view(1, c, 1, 1) + EPS)
        expected[g::s] = normed * w_ref.view(1, c, 1, 1) + b_ref.view(1, c, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # Running stats: the mean over groups of each group's own momentum update.
    exp_rm = torch.stack([(1 - MOMENTUM) * rm0 + MOMENTUM * mu for mu in means]).mean(0)
    exp_rv = torch.stack([(1 - MOMENTUM) * rv0 + MOMENTUM * v for v in unbiased_vars]).mean(0)
    torch.testing.assert_close(bn.running_mean, exp_rm)
    torch.testing.assert_close(bn.running_var, exp_rv)
    assert bn.num_batches_tracked.item() == 1

    # Gradients: the weight gradient sums the groups' contributions.
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, b_ref.grad, rtol=1e-4, atol=1e-5)


def test_split_bn_differs_from_whole_batch_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, 2)
    x[0::3] += 5.0  # group 0 has a different mean from the batch
    split, plain = SplitBatchNorm2d(3, num_splits=3), nn.BatchNorm2d(3)
    assert (split(x) - plain(x)).abs().max() > 0.1


def test_split_bn_eval_equals_batchnorm2d() -> None:
    torch.manual_seed(0)
    split = _split_bn()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split.state_dict())
    split.eval()
    plain.eval()
    x = torch.randn(5, 3, 4, 4)  # any batch size in eval mode
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)
    assert split.num_batches_tracked.item() == 0


def test_split_bn_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    a, b = _split_bn(), _split_bn()
    out = b(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, a(x))
    torch.testing.assert_close(b.running_var, a.running_var)


def test_split_bn_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match="not divisible by num_splits=3"):
        _split_bn()(torch.randn(4, 3, 2, 2))


def test_convert_keeps_state_and_keys() -> None:
    net = torchvision.models.resnet18()
    with torch.no_grad():
        net.bn1.running_mean.uniform_()
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    bn1_weight = net.bn1.weight
    converted = convert_split_bn(net, 4)
    assert converted is net
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(type(m) is SplitBatchNorm2d for m in bns)
    assert all(m.num_splits == 4 for m in bns)
    assert net.bn1.weight is bn1_weight  # optimizer references stay valid
    state = net.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torchvision.models.resnet18().load_state_dict(state)


def test_convert_is_noop_for_one_split_and_handles_bare_bn() -> None:
    net = torchvision.models.resnet18()
    assert convert_split_bn(net, 1) is net
    assert type(net.bn1) is nn.BatchNorm2d
    bn = nn.BatchNorm2d(3).eval()
    split = convert_split_bn(bn, 2)
    assert isinstance(split, SplitBatchNorm2d) and not split.training


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different RNG per rank: rank 0's permutation must win
        x = (torch.arange(5 * rank, 5 * rank + 5, dtype=torch.float32)).unsqueeze(1).repeat(1, 3)
        shuffled, idx_unshuffle = batch_shuffle(x)
        restored = batch_unshuffle(shuffled * 1.0, idx_unshuffle)
        torch.save(
            {"x": x, "shuffled": shuffled, "restored": restored, "idx": idx_unshuffle},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_shuffle_unshuffle_two_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in results:
        torch.testing.assert_close(r["restored"], r["x"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["idx"], results[1]["idx"], rtol=0, atol=0)
    x_all = torch.cat([r["x"] for r in results])
    shuffled_all = torch.cat([r["shuffled"] for r in results])
    torch.testing.assert_close(shuffled_all[:, 0].sort().values, x_all[:, 0], rtol=0, atol=0)
    # The permutation is applied to the gathered batch: rows travel between ranks.
    torch.testing.assert_close(shuffled_all[results[0]["idx"]], x_all, rtol=0, atol=0)
    assert not torch.equal(shuffled_all, x_all)


def test_converted_resnet_equals_plain_resnet_per_group() -> None:
    """A split-BN ResNet on one batch equals plain ResNets on each group ("one GPU each")."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4)
    split = convert_split_bn(copy.deepcopy(plain), 2)
    gpus = [copy.deepcopy(plain), copy.deepcopy(plain)]
    x = torch.randn(4, 3, 32, 32)
    out = split(x)
    expected = torch.empty_like(out)
    for g, net in enumerate(gpus):
        expected[g::2] = net(x[g::2])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for name in ("bn1", "layer4.1.bn2"):
        per_gpu = [net.get_submodule(name).running_var for net in gpus]
        torch.testing.assert_close(split.get_submodule(name).running_var, sum(per_gpu) / 2)
