"""Every registered method on float64 and bfloat16 models: tuned in that dtype, or tuned in float32 and cast after.

float64 is checked to float64 precision (a factor or an intermediate kept in float32 shows up as a ~1e-7 error);
bfloat16 for forward and backward of a model cast after tuning (a bfloat16 model tuned as such: tests/test_matrix.py).
A method that cannot support a dtype must refuse it when applied, not fail inside the forward."""
import functools
import pytest, torch
from subspace_nb.core import METHODS, load_all, get_method
from subspace_nb.inject import apply_tuning, merge, unmerge, regularizer
from subspace_nb.models import tiny_model, tiny_batch
from tuned_helpers import outputs, method_params

load_all()
NAMES = sorted(n for n in METHODS if not n.startswith('_'))
CLS = {n: get_method(n) for n in NAMES}
HP = {n: getattr(CLS[n], 'test_hp', {}) for n in NAMES}
ARCHS = ('bert', 'llama')                       # a Linear encoder and a decoder with RoPE, no biases, GQA
NOT_APPLICABLE = {('bitfit', 'llama')}          # no biases to train (tests/test_matrix.py checks the refusal)


def tuned(name, arch, dtype, when):
    "`name` on a tiny `arch` model in `dtype`: applied to a model already in `dtype` ('before') or cast after tuning ('after')."
    if when == 'before': return apply_tuning(tiny_model(arch, dtype=dtype), name, **HP[name])
    return apply_tuning(tiny_model(arch), name, **HP[name]).to(dtype)


@functools.cache
def plain_outputs(arch):
    return outputs(tiny_model(arch, dtype=torch.float64), tiny_batch())


def backward_(m, x, name):
    (m(**x).logits.double().square().sum() + regularizer(m)).backward()
    grads = [p.grad for p in method_params(m).values() if p.grad is not None]
    assert grads, f"no gradient reaches {name}"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradients"


def perturb_(m, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method_params(m).values(): p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@pytest.mark.parametrize('arch,when', [(a, 'before') for a in ARCHS] + [('llama', 'after')])   # one arch shows what `.to()` misses
@pytest.mark.parametrize('name', NAMES)
def test_float64(name, arch, when):
    "float64 outputs and trainable parameters, function-preserving at init and merging to float64 precision, unmerging every bit."
    if (name, arch) in NOT_APPLICABLE: return
    x, tol = tiny_batch(), dict(rtol=1e-9, atol=1e-10)
    m = tuned(name, arch, torch.float64, when)
    bad = {n: p.dtype for n, p in m.named_parameters() if p.requires_grad and p.dtype != torch.float64}
    assert not bad, f"{name}: trainable parameters not in float64: {dict(list(bad.items())[:3])}"
    y = outputs(m, x)
    assert y.dtype == torch.float64, f"{name}: {y.dtype} outputs from a float64 model"
    if CLS[name].preserving and when == 'before': torch.testing.assert_close(y, plain_outputs(arch), **tol)
    backward_(m, x, name)
    perturb_(m)
    y = outputs(m, x)
    state = {n: t.detach().clone() for n, t in m.state_dict().items()}
    if not CLS[name].linear:
        with pytest.raises(TypeError, match='not linear'): merge(m)
        return
    merge(m)
    torch.testing.assert_close(outputs(m, x), y, **tol)
    unmerge(m)
    for n, t in m.state_dict().items(): assert torch.equal(t, state[n]), f"unmerge did not restore {n}"
    assert torch.equal(outputs(m, x), y)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_cast_after_tuning(name, arch):
    "Tuned in float32, then `model.to(torch.bfloat16)`: bfloat16 outputs, finite gradients."
    if (name, arch) in NOT_APPLICABLE: return
    x = tiny_batch()
    m = tuned(name, arch, torch.bfloat16, 'after')
    assert outputs(m, x).dtype == torch.bfloat16
    backward_(m, x, name)
