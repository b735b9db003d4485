"""VeRA against HF PEFT's VeRA: the same numbers in both give the same model.

With one shape of target layers and the same seed, our shared A, B are PEFT's vera_A, vera_B bit for bit; with
several shapes PEFT slices one pair while we draw one pair per shape, so there PEFT's slices are copied into ours."""
import pytest, torch
from subspace_nb.inject import apply_tuning, tuners, merge
from subspace_nb.models import tiny_model, tiny_batch
from subspace_nb.extension.shared import shared_factors

peft = pytest.importorskip('peft')
PREFIX = 'base_model.model.'


def peft_vera(targets, r, seed):
    cfg = peft.VeraConfig(r=r, target_modules=targets, projection_prng_key=seed, d_initial=0.1, vera_dropout=0.0)
    m = peft.get_peft_model(tiny_model('bert'), cfg)
    layers = {n[len(PREFIX):]: mod for n, mod in m.named_modules() if hasattr(mod, 'vera_lambda_d')}
    return m.eval(), layers


def train_like_(ours, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuners(ours).values():
            t.lambda_d.copy_(torch.randn(t.lambda_d.shape, generator=g))
            t.lambda_b.copy_(torch.randn(t.lambda_b.shape, generator=g))


def copy_vectors_(ours, layers):
    with torch.no_grad():
        for name, t in tuners(ours).items():
            layers[name].vera_lambda_d['default'].copy_(t.lambda_d)
            layers[name].vera_lambda_b['default'].copy_(t.lambda_b)


def logits(m):
    with torch.no_grad(): return m(**tiny_batch()).logits


def test_initial_state_matches():
    ours = apply_tuning(tiny_model('bert'), 'vera', targets=['query', 'value'], r=4, seed=7).eval()
    theirs, layers = peft_vera(['query', 'value'], r=4, seed=7)
    assert set(layers) == set(tuners(ours))
    for name, t in tuners(ours).items():
        assert torch.equal(t.lambda_d, layers[name].vera_lambda_d['default'])      # d = 0.1
        assert torch.equal(t.lambda_b, layers[name].vera_lambda_b['default'])      # b = 0
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=0)


def test_one_shape_same_seed_same_projections_same_outputs():
    ours = apply_tuning(tiny_model('bert'), 'vera', targets=['query', 'value'], r=4, seed=7).eval()
    theirs, layers = peft_vera(['query', 'value'], r=4, seed=7)
    sh = shared_factors(ours)
    assert sh.keys == ['32x32']
    assert torch.equal(sh.A_0, theirs.base_model.vera_A['default'])             # the same kaiming-uniform draws
    assert torch.equal(sh.B_0, theirs.base_model.vera_B['default'])
    train_like_(ours)
    copy_vectors_(ours, layers)
    y = logits(ours)
    assert (y - logits(tiny_model('bert'))).abs().max() > 1e-3                   # the tuning does something
    torch.testing.assert_close(y, logits(theirs), rtol=1e-5, atol=1e-6)
    for name, t in tuners(ours).items():
        torch.testing.assert_close(t.delta(), layers[name].get_delta_weight('default'), rtol=1e-5, atol=1e-7)


def test_several_shapes_with_peft_slices():
    ours = apply_tuning(tiny_model('bert'), 'vera', r=4, seed=3).eval()         # 32x32, 32x37, 37x32 layers
    names = list(tuners(ours))
    theirs, layers = peft_vera(names, r=4, seed=3)
    assert set(layers) == set(names)
    A, B = theirs.base_model.vera_A['default'], theirs.base_model.vera_B['default']
    assert A.shape == (4, 37) and B.shape == (37, 4)                             # one pair of the largest widths
    sh = shared_factors(ours)
    assert not torch.equal(sh.A_0, A[:, :32])                                    # our draws differ: one pair per shape
    with torch.no_grad():                                                        # give ours PEFT's slices
        for i, key in enumerate(sh.keys):
            n, m = map(int, key.split('x'))
            sh.get('A', i).copy_(A[:, :n]); sh.get('B', i).copy_(B[:m, :])
    train_like_(ours, seed=2)
    copy_vectors_(ours, layers)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-6)
    for name, t in tuners(ours).items():
        torch.testing.assert_close(t.delta(), layers[name].get_delta_weight('default'), rtol=1e-5, atol=1e-7)
    y = logits(ours)                                                             # merged: still PEFT's outputs
    merge(ours)
    torch.testing.assert_close(logits(ours), y, rtol=1e-5, atol=1e-6)
