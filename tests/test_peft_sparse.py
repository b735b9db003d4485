"""LN tuning, SHiRA and MiSS against HF PEFT's `ln_tuning`, `shira` and `miss` on a tiny BERT: with the same values
(moved off their initial ones), the same outputs and the same gradients."""
import copy
import pytest, torch
import peft                                   # a test-only dependency (dev extra)
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.models import tiny_model, tiny_batch

X = tiny_batch()
QV = ['query', 'value']


def pair(method, cfg, **hp):
    "Our tuning and PEFT's of the same tiny BERT, both in eval mode (no dropout)."
    base = tiny_model('bert')
    return apply_tuning(copy.deepcopy(base), method, **hp).eval(), peft.get_peft_model(copy.deepcopy(base), cfg).eval(), base


def run(m):
    "The logits, after a backward pass of a fixed loss that leaves every gradient in place."
    m.zero_grad()
    y = m(**X).logits
    y.square().sum().backward()
    return y.detach()


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def check(base, ours, theirs, pairs):
    "Same outputs, different from the base's; the same gradient on each (ours, theirs) pair of parameters."
    with torch.no_grad(): y0 = base.eval()(**X).logits
    y1, y2 = run(ours), run(theirs)
    assert not torch.allclose(y0, y1, atol=1e-3)              # the values do something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in pairs:
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad.view_as(a.grad), rtol=1e-4, atol=1e-6)


def test_ln_tuning_matches_peft():
    ours, theirs, base = pair('ln-tuning', peft.LNTuningConfig(target_modules=['LayerNorm']))
    norms = [n for n, m in ours.named_modules() if type(m).__name__ == 'LayerNorm']
    assert len(norms) == 5
    g, pairs = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for n in norms:
            mine, copy_ = ours.get_submodule(n), peft_layer(theirs, n).ln_tuning_layers['default']
            for k in ('weight', 'bias'):
                p, q = getattr(mine, k), getattr(copy_, k)
                p.add_(0.3 * torch.randn(p.shape, generator=g)); q.copy_(p)
                pairs.append((p, q))
    check(base, ours, theirs, pairs)


def test_shira_matches_peft():
    ours, theirs, base = pair('shira', peft.ShiraConfig(r=2, target_modules=QV, random_seed=7), r=2, targets=QV)
    g, pairs = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for n, t in tuners(ours).items():
            layer = peft_layer(theirs, n)
            rows, cols = layer.shira_indices['default'].long()
            assert len(rows) == t.k == 2 * (t.n + t.m)
            t.idx.copy_(rows * t.n + cols)                    # PEFT's mask, as flat positions of the (m, n) weight
            v = torch.randn(t.k, generator=g)
            t.d.copy_(v); layer.shira_weight['default'].copy_(v)
            pairs.append((t.d, layer.shira_weight['default']))
    assert len(pairs) == 4
    check(base, ours, theirs, pairs)


@pytest.mark.parametrize('mini_r', [None, 8])
def test_miss_matches_peft(mini_r):
    cfg = peft.MissConfig(r=4, target_modules=QV, **(dict(init_weights='mini', mini_r=mini_r) if mini_r else {}))
    ours, theirs, base = pair('miss', cfg, r=4, mini_r=mini_r, targets=QV)
    g, pairs = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for n, t in tuners(ours).items():
            block = peft_layer(theirs, n).miss_block['default']
            assert block.shape == t.D.shape == (4, mini_r or t.m)
            t.D.copy_(torch.randn(t.D.shape, generator=g)); block.copy_(t.D)
            pairs.append((t.D, block))
    assert len(pairs) == 4
    check(base, ours, theirs, pairs)
