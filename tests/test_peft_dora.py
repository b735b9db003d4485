"""DoRA and PiSSA against HF PEFT (a test-only dependency): with the same parameter values, the same function.

Our `dora` is compared with `LoraConfig(use_dora=True)`: outputs, gradients of A, B and the magnitude, and the merged
weights, on the five tiny architectures and the embedded MiniLM. Our `pissa` is compared with
`LoraConfig(init_lora_weights='pissa')`: the same principal part at initialisation and the same outputs after
training-like changes, although PEFT writes the residual into the layer and we keep the original weight."""
import copy
import pytest, torch
from peft import LoraConfig, get_peft_model   # a test-only dependency (dev extra): imported, never skipped
from subspace_nb.inject import apply_tuning, tuners, remove_tuning
from subspace_nb.models import ARCHS, tiny_model, tiny_batch, load_minilm
import subspace_nb.combination.decomposed  # noqa: F401  (registers the methods)


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def dora_pair(base, r=4, alpha=8, seed=1):
    "Our DoRA and PEFT's on copies of `base`, with the same moved A, B and magnitude in every tuned layer."
    ours = apply_tuning(copy.deepcopy(base), 'dora', r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuners(ours).values():
            t.A.add_(0.05 * torch.randn(t.A.shape, generator=g))
            t.B.normal_(std=0.05, generator=g)
            t.magnitude.mul_(1 + 0.1 * torch.randn(t.magnitude.shape, generator=g))
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, lora_dropout=0.0, target_modules=list(tuners(ours)))
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, t in tuners(ours).items():
            lay = peft_layer(pm, n)
            lay.lora_A['default'].weight.copy_(t.A)
            lay.lora_B['default'].weight.copy_(t.B)
            lay.lora_magnitude_vector['default'].weight.copy_(t.magnitude)
    return ours.eval(), pm.eval()


def check_same(ours, pm, x):
    with torch.no_grad():
        y1, y2 = ours(**x).logits, pm(**x).logits
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    ours(**x).logits.square().sum().backward()                     # gradients of the same loss
    pm(**x).logits.square().sum().backward()
    for n, t in tuners(ours).items():
        lay = peft_layer(pm, n)
        for mine, theirs in ((t.A, lay.lora_A['default'].weight), (t.B, lay.lora_B['default'].weight),
                             (t.magnitude, lay.lora_magnitude_vector['default'].weight)):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    names = list(tuners(ours))
    merged = remove_tuning(copy.deepcopy(ours), merge=True)        # merged weights
    plain = pm.merge_and_unload()
    for n in names:
        torch.testing.assert_close(merged.get_submodule(n).weight, plain.get_submodule(n).weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arch', ARCHS)
def test_dora_equals_peft_tiny(arch):
    ours, pm = dora_pair(tiny_model(arch))
    check_same(ours, pm, tiny_batch())


def test_dora_equals_peft_minilm():
    base, tok = load_minilm()
    ours, pm = dora_pair(base, r=8, alpha=16)
    x = tok(['a gripping, funny film', 'tedious and far too long'], padding=True, return_tensors='pt')
    check_same(ours, pm, dict(x))


def test_dora_bfloat16_close_to_peft():
    "In bfloat16 PEFT computes the norms in bfloat16, we in float32: the outputs agree to bfloat16 precision."
    ours, pm = dora_pair(tiny_model('llama', dtype=torch.bfloat16))
    x = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, pm(**x).logits, rtol=3e-2, atol=3e-2)


def test_dora_zero_row_finite_and_equal_elsewhere():
    "A zero weight row: our output is finite and equals the bias there; elsewhere it equals PEFT's."
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 7))
    with torch.no_grad(): base[0].weight[2] = 0
    ours = apply_tuning(copy.deepcopy(base), 'dora', targets=['0'], trainable=[], r=2)
    t = tuners(ours)['0']
    with torch.no_grad(): t.B.normal_(); t.B[2] = 0
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=['0']))
    lay = peft_layer(pm, '0')
    with torch.no_grad():
        lay.lora_A['default'].weight.copy_(t.A); lay.lora_B['default'].weight.copy_(t.B)
        lay.lora_magnitude_vector['default'].weight.copy_(t.magnitude)
    x = torch.randn(4, 10)
    y, y_peft = ours(x), pm(x).detach()
    y.square().sum().backward()
    assert y.isfinite().all() and all(p.grad.isfinite().all() for p in (t.A, t.B, t.magnitude))
    assert torch.equal(y[:, 2].detach(), base[0].bias[2].detach().expand(4))
    keep = [0, 1, 3, 4, 5, 6]
    torch.testing.assert_close(y[:, keep].detach(), y_peft[:, keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arch', ['bert', 'llama'])
def test_pissa_equals_peft(arch):
    "PEFT's PiSSA keeps W_res = W - U_r S_r V_r^T in the layer; ours keeps W and subtracts A0 B0 on the fly."
    base, r = tiny_model(arch), 4
    ours = apply_tuning(copy.deepcopy(base), 'pissa', r=r)        # alpha = r: s = 1
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=r, init_lora_weights='pissa',
                                                        target_modules=list(tuners(ours))))
    for n, t in tuners(ours).items():
        lay = peft_layer(pm, n)
        A, B = lay.lora_A['default'].weight, lay.lora_B['default'].weight
        torch.testing.assert_close(t.B0 @ t.A0, B @ A, rtol=1e-4, atol=1e-5)        # the same principal part
        torch.testing.assert_close(lay.base_layer.weight, t.W - t.B0 @ t.A0, rtol=1e-5, atol=1e-5)   # PEFT's W_res
        assert torch.equal(t.W, base.get_submodule(n).weight)                        # ours: the original W
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, t in tuners(ours).items():
            t.A.add_(0.05 * torch.randn(t.A.shape, generator=g)); t.B.add_(0.05 * torch.randn(t.B.shape, generator=g))
            lay = peft_layer(pm, n)
            lay.lora_A['default'].weight.copy_(t.A); lay.lora_B['default'].weight.copy_(t.B)
    x = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**x).logits, pm.eval()(**x).logits, rtol=1e-4, atol=1e-5)
