"""LoRA against HF PEFT's LoRA (a test-only dependency): with the same A and B, the same outputs, gradients and merged
weights, on the five tiny architectures (GPT-2's Conv1D included) and the embedded MiniLM."""
import copy
import pytest, torch
from peft import LoraConfig, get_peft_model
from subspace_nb.inject import apply_tuning, tuners, remove_tuning
from subspace_nb.models import ARCHS, tiny_model, tiny_batch, load_minilm


def pair(base, r=4, alpha=8, seed=1):
    ours = apply_tuning(copy.deepcopy(base), 'lora', r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tuners(ours).values(): t.B.normal_(std=0.05, generator=g)        # as if trained: B no longer 0
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                        target_modules=list(tuners(ours))))
    with torch.no_grad():
        for n, t in tuners(ours).items():
            lay = pm.base_model.model.get_submodule(n)
            lay.lora_A['default'].weight.copy_(t.A)
            lay.lora_B['default'].weight.copy_(t.B)
    return ours.eval(), pm.eval()


@pytest.mark.parametrize('arch', [*ARCHS, 'minilm'])
def test_lora_equals_peft(arch):
    base, x = (load_minilm()[0], None) if arch == 'minilm' else (tiny_model(arch), tiny_batch())
    if x is None:
        g = torch.Generator().manual_seed(0)
        x = dict(input_ids=torch.randint(1000, 5000, (2, 9), generator=g), attention_mask=torch.ones(2, 9, dtype=torch.long))
    ours, pm = pair(base)
    with torch.no_grad(): y0, y1, y2 = base(**x).logits, ours(**x).logits, pm(**x).logits
    assert not torch.allclose(y0, y1, atol=1e-4)                                  # the change does something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    ours(**x).logits.square().sum().backward(); pm(**x).logits.square().sum().backward()
    for n, t in tuners(ours).items():
        lay = pm.base_model.model.get_submodule(n)
        torch.testing.assert_close(t.A.grad, lay.lora_A['default'].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(t.B.grad, lay.lora_B['default'].weight.grad, rtol=1e-4, atol=1e-6)
    names = list(tuners(ours))
    merged, plain = remove_tuning(copy.deepcopy(ours), merge=True), pm.merge_and_unload()
    for n in names:
        torch.testing.assert_close(merged.get_submodule(n).weight, plain.get_submodule(n).weight, rtol=1e-5, atol=1e-6)
