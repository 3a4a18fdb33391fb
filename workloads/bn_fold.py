"""The attack's BN-folded copy of a ResNet: the same function with half the layers.

During the attack BN runs on its running statistics (docs/design.md section 5: the attack must not see or change batch
statistics), so each BN is an affine map that can be merged into the preceding convolution's weights. Every PGD
iteration (a forward and an input gradient) then runs through fewer layers; with PGD-N training costing about
(2N + 3) / 3 clean steps (Section 3), the attack is most of a cell's compute. MBN folds the branch in use; GN
depends on the image and stays.

The training loop and the evaluation hold one `FoldedForAttack` per network and pass its copy to `attacks.pgd`
explicitly (training: `folded.attacked()`, compiled as a graph of its own when the cell compiles; evaluation:
`folded.current()`); nothing here is a submodule of the network, so DDP, the network's compiled training graph and
the checkpoint never see it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from workloads.attacks import GraphedAttack
from workloads.execution import compile_model
from workloads.models import MixedBatchNorm2d, ResNet


def fold_batch_norms(model: ResNet) -> ResNet:
    """A new, independent inference copy of `model` with every BN folded into the convolution before it.

    Gradients flow to the input only: the copy's weights are detached from the model's. `FoldedForAttack` keeps
    one such copy and refreshes it in place, which is what the attack uses.
    """
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    for parent, conv_name, norm_name in _conv_norm_pairs(twin):
        layer = getattr(parent, norm_name)
        norm = _active_bn(layer)
        if norm is None:
            continue
        conv: nn.Conv2d = getattr(parent, conv_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, norm_name, nn.Identity())
        if getattr(parent, "last_norm", None) is layer:  # the alias would keep the folded BN in the copy
            parent.last_norm = getattr(parent, norm_name)
    return twin


class FoldedForAttack:
    """The BN-folded copy of one network with that network's current weights, for one attack at a time.

    The copy is built once and refreshed in place by `current()`, from the current weights, BN statistics and MBN
    branch, with a few multi-tensor kernels. A new copy per training step would cost a deep copy of every module,
    ~0.2 s of host time for ResNet-152, while the whole PGD-10 step of a batch of 32 is ~17 TFLOP, ~40 ms at 40% of
    an H100's bf16 peak: the GPU would mostly wait for the host. The copy is rebuilt when the network's tensors
    were replaced (another device, dtype or memory format).

    `attacked()` is the copy as the training attack calls it: `compiled`, a `torch.compile`d graph of its own
    (eval mode only, no parameter needs a gradient, so its backward computes the input's gradient alone; the
    in-place refresh changes no guarded property, so it never recompiles); `graphed`, wrapped in a
    `GraphedAttack` (the whole attack as one CUDA graph). Both wrappers are rebuilt with the copy.
    """

    def __init__(self, network: ResNet, *, compiled: bool = False, graphed: bool = False) -> None:
        self.network = network
        self.compiled = compiled
        self.graphed = graphed
        self._twin: _FoldedTwin | None = None
        self._attacked: nn.Module | None = None

    def current(self) -> ResNet:
        key = _tensor_key(self.network)
        if self._twin is None or self._twin.key != key:
            self._twin = _FoldedTwin(self.network, fold_batch_norms(self.network), key)
            self._attacked = None
        self._twin.refresh()
        return self._twin.model

    def attacked(self) -> nn.Module:
        """The refreshed copy, compiled and/or graphed as asked."""
        twin = self.current()
        if self._attacked is None:
            module: nn.Module = compile_model(twin, "attack") if self.compiled else twin
            self._attacked = GraphedAttack(module) if self.graphed else module
        return self._attacked


def _conv_norm_pairs(model: ResNet) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) of every convolution followed by a norm layer, in forward order."""
    pairs: list[tuple[nn.Module, str, str]] = [(model, "conv1", "bn1")]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
            shortcut = getattr(block, "downsample", None)
            if isinstance(shortcut, nn.Sequential):
                pairs.append((shortcut, "0", "1"))
    return pairs


def _active_bn(norm: nn.Module) -> nn.BatchNorm2d | None:
    """The BN a norm layer applies in eval mode (MBN: its current branch); None for GN, which cannot be folded."""
    if isinstance(norm, MixedBatchNorm2d):
        norm = norm.adv if norm.branch == "adv" else norm.clean
    return norm if isinstance(norm, nn.BatchNorm2d) else None


def _tensor_key(model: nn.Module) -> tuple[object, ...]:
    """Changes when the model's tensors are replaced (`.to(device)`, a dtype or memory-format conversion), not when
    their values change (optimizer steps, `load_state_dict`): the first weight's storage, device, dtype and strides."""
    first = next(model.parameters())
    return (first.data_ptr(), first.device, first.dtype, first.stride(), sum(1 for _ in model.parameters()))


class _FoldedTwin:
    """A BN-folded copy of a ResNet and the map from the original's tensors to the copy's, for in-place refresh.

    Refreshing computes exactly what `torch.nn.utils.fusion.fuse_conv_bn_weights` computes, in the same order of
    operations (so on the CPU the twin's weights are bit-identical to a fresh `fold_batch_norms`), but batched:
    the `torch._foreach_*` kernels handle every layer at once on CUDA.
    """

    def __init__(self, source: ResNet, twin: ResNet, key: tuple[object, ...]) -> None:
        self.model = twin
        self.key = key
        self.norms: list[nn.Module] = []  # the source's norm layer of each folded pair (MBN: resolved per refresh)
        self.source_convs: list[nn.Conv2d] = []
        self.twin_convs: list[nn.Conv2d] = []
        for (s_parent, conv_name, norm_name), (t_parent, _, _) in zip(
            _conv_norm_pairs(source), _conv_norm_pairs(twin), strict=True
        ):
            norm = getattr(s_parent, norm_name)
            if _active_bn(norm) is None:
                continue
            self.norms.append(norm)
            self.source_convs.append(getattr(s_parent, conv_name))
            self.twin_convs.append(getattr(t_parent, conv_name))
        # Everything that is not folded (the classifier, GN affine parameters, convolutions without BN) is copied.
        folded = {id(c.weight) for c in self.twin_convs} | {id(c.bias) for c in self.twin_convs}
        twin_params = dict(twin.named_parameters())
        self.plain_src: list[torch.Tensor] = []
        self.plain_dst: list[torch.Tensor] = []
        for name, param in source.named_parameters():
            dst = twin_params.get(name)
            if dst is not None and id(dst) not in folded:
                self.plain_src.append(param)
                self.plain_dst.append(dst)

    @torch.no_grad()
    def refresh(self) -> None:
        if self.plain_dst:
            torch._foreach_copy_(self.plain_dst, self.plain_src)
        if not self.norms:
            return
        means: list[torch.Tensor] = []
        variances: list[torch.Tensor] = []
        gammas: list[torch.Tensor] = []
        betas: list[torch.Tensor] = []
        eps: list[float] = []
        for norm in self.norms:
            bn = _active_bn(norm)
            assert bn is not None and bn.running_mean is not None and bn.running_var is not None
            means.append(bn.running_mean)
            variances.append(bn.running_var)
            gammas.append(bn.weight)
            betas.append(bn.bias)
            eps.append(bn.eps)
        # fuse_conv_bn_weights: w' = w * (gamma * rsqrt(var + eps)); b' = (b - mean) * rsqrt(var + eps) * gamma + beta
        rsqrt = torch._foreach_add(variances, eps)
        torch._foreach_rsqrt_(rsqrt)
        scale = torch._foreach_mul(gammas, rsqrt)
        weights: list[torch.Tensor] = [c.weight for c in self.twin_convs]
        torch._foreach_copy_(weights, [c.weight for c in self.source_convs])
        torch._foreach_mul_(weights, [s.reshape(-1, 1, 1, 1) for s in scale])
        shift = [torch.neg(m) if c.bias is None else c.bias - m for c, m in zip(self.source_convs, means, strict=True)]
        torch._foreach_mul_(shift, rsqrt)
        torch._foreach_mul_(shift, gammas)
        torch._foreach_add_(shift, betas)
        biases: list[torch.Tensor] = []
        for conv in self.twin_convs:
            assert conv.bias is not None  # fuse_conv_bn_eval gives every folded convolution a bias
            biases.append(conv.bias)
        torch._foreach_copy_(biases, shift)
