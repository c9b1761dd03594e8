"""swap_blocks on models written for something else: a nanoGPT-style Pre-LN transformer, a
pre-activation ResNet and a torchvision-style post-activation ResNet, as their authors write them
(dropout, BatchNorm, in-place ReLU, projection shortcuts), checked against the original model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import odenet

# ---------------------------------------------------------------------------- nanoGPT-style


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd=32, n_head=4, dropout=0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab=50, n_layer=4, n_embd=32, dropout=0.1):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(16, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(n_embd, dropout=dropout) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


GPT_BRANCHES = lambda b: (lambda x: b.attn(b.ln_1(x)), lambda x: b.mlp(b.ln_2(x)))  # noqa: E731

# ---------------------------------------------------------------------------- ResNets


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class PreActBlock(nn.Module):
    """The pre-activation basic block (He et al., 2016b): conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


PREACT_BRANCHES = lambda b: (lambda x: b.conv2(F.relu(b.bn2(b.conv1(F.relu(b.bn1(x)))))),)  # noqa: E731
POSTACT_BRANCHES = lambda b: (lambda x: b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))),)  # noqa: E731


class ResNet(nn.Module):
    """Two stages of two blocks; the first block of stage 2 halves the resolution through a projection."""

    def __init__(self, block, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        if block is BasicBlock:
            down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
            self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
            self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, down), BasicBlock(2 * width, 2 * width))
        else:
            self.layer1 = nn.Sequential(block(width, width), block(width, width))
            self.layer2 = nn.Sequential(block(width, 2 * width, 2), block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _param_ids(model):
    return {id(p) for p in model.parameters()}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_gpt_euler_form_is_the_original_model(merge, train):
    torch.manual_seed(0)
    model = GPT().train(train)
    idx = torch.randint(0, 50, (3, 16))
    converted = odenet.swap_blocks(copy.deepcopy(model), solver="euler", select=Block, branches=GPT_BRANCHES,
                                   merge=merge)
    torch.manual_seed(1)  # the same dropout draws, in the same order
    ref = model(idx)
    torch.manual_seed(1)
    out = converted(idx)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    n_runs = sum(isinstance(m, odenet.residual.ResidualRun) for m in converted.modules())
    assert n_runs == (1 if merge else 4) and len(converted.transformer.h) == n_runs


def test_gpt_keeps_its_parameter_objects_and_trains_under_adjoint():
    torch.manual_seed(0)
    model = GPT(dropout=0.0).double()
    before = _param_ids(model)
    model = odenet.swap_blocks(model, solver="dopri5", rtol=1e-8, atol=1e-8, gradient="adjoint", select=Block,
                               branches=GPT_BRANCHES, merge=True)
    assert _param_ids(model) == before
    idx = torch.randint(0, 50, (2, 16))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".h." in n and "bias" not in n)
    model.zero_grad()
    model = odenet.swap_blocks(model, solver="dopri5", gradient="direct")  # keeps rtol/atol
    assert model.transformer.h[0].options.control == odenet.Adaptive(1e-8, 1e-8)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for n, p in model.named_parameters():  # the adjoint's gradient is accurate to its tolerance
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_merged_run_is_one_adaptive_solve_and_costs_less():
    torch.manual_seed(0)
    model = GPT(dropout=0.0).eval()
    idx = torch.randint(0, 50, (2, 16))
    kw = dict(solver="dopri5", rtol=1e-3, atol=1e-3, select=Block, branches=GPT_BRANCHES)
    separate = odenet.swap_blocks(copy.deepcopy(model), **kw)
    merged = odenet.swap_blocks(copy.deepcopy(model), merge=True, **kw)
    separate(idx), merged(idx)
    nfe_separate = sum(r.last_stats.nfe_forward for r in separate.transformer.h)
    nfe_merged = merged.transformer.h[0].last_stats.nfe_forward
    assert nfe_merged < nfe_separate
    tight = dict(kw, rtol=1e-9, atol=1e-9)  # the same ODE, solved tightly both ways
    model = model.double()
    ys = odenet.swap_blocks(copy.deepcopy(model), **tight)(idx)
    ym = odenet.swap_blocks(copy.deepcopy(model), merge=True, **tight)(idx)
    torch.testing.assert_close(ym, ys, rtol=1e-6, atol=1e-6)


def test_fixed_steps_converge_to_the_adaptive_solution():
    """rk4 with `steps` per block approaches the tightly solved unsplit field as steps grow."""
    torch.manual_seed(0)
    model = GPT(dropout=0.0).eval().double()
    idx = torch.randint(0, 50, (2, 16))
    kw = dict(select=Block, branches=GPT_BRANCHES)
    exact = odenet.swap_blocks(copy.deepcopy(model), solver="dopri5", rtol=1e-10, atol=1e-10, **kw)(idx)
    errs = [(odenet.swap_blocks(copy.deepcopy(model), solver="rk4", steps=n, **kw)(idx) - exact).abs().max().item()
            for n in (1, 2, 4)]
    assert errs[2] < errs[1] < errs[0] and errs[1] / errs[2] > 8  # about 2^4 per halving


@pytest.mark.parametrize("train", [False, True])
def test_preactivation_resnet_euler_form_is_the_original(train):
    torch.manual_seed(0)
    model = ResNet(PreActBlock).train(train)
    x = torch.randn(4, 1, 8, 8)
    ref_model = copy.deepcopy(model)
    model = odenet.swap_blocks(model, solver="euler", select=PreActBlock, branches=PREACT_BRANCHES, merge=True)
    torch.testing.assert_close(model(x), ref_model(x), rtol=1e-6, atol=1e-6)
    for a, b in zip(model.buffers(), ref_model.buffers()):  # BatchNorm statistics moved alike
        torch.testing.assert_close(a, b)
    report = odenet.swap_report(model)
    assert "layer2.0: discrete: changes the state's shape (4, 8, 8, 8) -> (4, 16, 4, 4)" in report
    assert report.count("ODE step") == 3


def test_preactivation_resnet_under_dopri5_with_projection_left_discrete():
    torch.manual_seed(0)
    model = ResNet(PreActBlock).eval()
    x = torch.randn(4, 1, 8, 8)
    model = odenet.swap_blocks(model, solver="dopri5", rtol=1e-5, atol=1e-5, select=PreActBlock,
                               branches=PREACT_BRANCHES)
    y = model(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    assert model.layer2[0].kinds[0].startswith("discrete") and model.layer2[0].last_stats is None
    assert model.layer1[0].last_stats.nfe_forward > 6


def test_postactivation_block_is_refused_naming_block_and_mismatch():
    torch.manual_seed(0)
    model = ResNet(BasicBlock).eval()
    x = torch.randn(4, 1, 8, 8)
    model = odenet.swap_blocks(model, solver="euler", select=BasicBlock, branches=POSTACT_BRANCHES)
    with pytest.raises(ValueError, match=r"Block 'layer1.0' \(BasicBlock\) is not its declared residual form.*"
                                         r"differs from it by [0-9.e+-]+.*pre-activation form.*strict=False"):
        model(x)


def test_postactivation_opt_in_drops_the_trailing_relu():
    torch.manual_seed(0)
    model = ResNet(BasicBlock).eval()
    x = torch.randn(4, 1, 8, 8)
    ref = copy.deepcopy(model)
    model = odenet.swap_blocks(model, solver="euler", select=BasicBlock, branches=POSTACT_BRANCHES, strict=False)
    y = model(x)
    # What it computes now: each same-shape block without its final ReLU; the projection block as it was.
    for blocks in (ref.layer1, ref.layer2):
        for i, b in enumerate(blocks):
            if b.downsample is None:
                blocks[i] = _NoFinalRelu(b)
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)


class _NoFinalRelu(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.b = b

    def forward(self, x):
        return x + POSTACT_BRANCHES(self.b)[0](x)


def test_wrong_branches_are_caught_on_the_first_forward():
    torch.manual_seed(0)
    model = GPT(dropout=0.0).eval()
    model = odenet.swap_blocks(model, solver="euler", select=Block, branches=lambda b: (lambda x: b.attn(b.ln_1(x)),))
    with pytest.raises(ValueError, match="'transformer.h.0' \\(Block\\)"):
        model(torch.randint(0, 50, (2, 8)))


def test_selecting_nothing_and_half_given_arguments_raise():
    model = GPT()
    with pytest.raises(ValueError, match=r"select=<class .*BasicBlock'>\) selected no module of GPT: nothing was converted"):
        odenet.swap_blocks(model, select=BasicBlock, branches=POSTACT_BRANCHES)
    with pytest.raises(TypeError, match="select= and branches= together"):
        odenet.swap_blocks(model, select=Block)
    with pytest.raises(TypeError, match="merge= and strict= apply to blocks converted with select="):
        odenet.swap_blocks(model, solver="dopri5", merge=True)
    with pytest.raises(TypeError, match="select must be a class"):
        odenet.swap_blocks(model, select="Block", branches=GPT_BRANCHES)
    assert isinstance(model.transformer.h[0], Block)  # nothing changed


def test_select_by_predicate():
    model = GPT(dropout=0.0).eval()
    model = odenet.swap_blocks(model, solver="euler", select=lambda name, m: name in ("transformer.h.1", "transformer.h.2"),
                               branches=GPT_BRANCHES, merge=True)
    kinds = [type(m).__name__ for m in model.transformer.h]
    assert kinds == ["Block", "ResidualRun", "Block"]


def test_swapping_an_odeblock_keeps_what_the_call_does_not_pass():
    f = odenet.MLPDynamics(2, 8)
    block = odenet.ODEBlock(f, "dopri5", gradient="adjoint", max_steps=7, rtol=1e-4, atol=1e-5, throw=False,
                            regularization=odenet.RNODE(kinetic=0.1))
    model = odenet.swap_blocks(nn.Sequential(block), solver="tsit5")
    new = model[0]
    assert new.options.solver_name == "tsit5"
    assert new.control == odenet.Adaptive(1e-4, 1e-5, max_steps=7) and new.gradient == odenet.Adjoint()
    assert new.options.throw is False and new.regularization == odenet.RNODE(kinetic=0.1)
    model = odenet.swap_blocks(model, solver="dopri5", rtol=1e-6)  # only rtol changes
    assert model[0].control == odenet.Adaptive(1e-6, 1e-5, max_steps=7)
    model = odenet.swap_blocks(model, solver="rk4")  # another kind of step control: rk4's default
    assert model[0].control == odenet.Fixed() and model[0].gradient == odenet.Adjoint()


def test_swapping_keeps_settings_and_names_conflicts():
    block = odenet.ODEBlock(odenet.MLPDynamics(2, 8), "dopri5", gradient="adjoint", adjoint_seminorm=True)
    new = odenet.swap_blocks(nn.Sequential(block), solver="dopri5", adjoint_rtol=1e-6)[0]
    assert new.gradient == odenet.Adjoint(rtol=1e-6, seminorm=True)
    direct = odenet.ODEBlock(odenet.MLPDynamics(2, 8), "dopri5")
    with pytest.raises(ValueError, match="adjoint_rtol apply to the adjoint, but this block's gradient method is Direct"):
        odenet.swap_blocks(nn.Sequential(direct), solver="dopri5", adjoint_rtol=1e-6)
    with pytest.raises(ValueError, match="steps= was given, but solver 'dopri5' is adaptive"):
        odenet.swap_blocks(nn.Sequential(direct), solver="dopri5", steps=3)
    assert odenet.swap_blocks(nn.Sequential(direct), solver="rk4", steps=3)[0].control == odenet.Fixed(steps=3)
