"(IA)³ against HF PEFT's IA3 configured on the same modules: with the same vectors, the same outputs."
import copy, re
import pytest, torch
import peft                                   # a test-only dependency (dev extra)
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.reconstruction.mode2 import IA3, FFN_DOWN
from subspace_nb.models import load_minilm


def test_ia3_matches_peft():
    base, tok = load_minilm()
    x = tok(['a gripping, funny film', 'tedious and long'], padding=True, return_tensors='pt')
    ours = apply_tuning(copy.deepcopy(base), 'ia3')
    names = list(tuners(ours))
    assert sum(bool(re.fullmatch(FFN_DOWN, n)) for n in names) == 6 and len(names) == 18
    assert not any('attention.output' in n for n in names)
    cfg = peft.IA3Config(target_modules=IA3.targets, feedforward_modules=FFN_DOWN, modules_to_save=['classifier'])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(0)
    found = 0
    with torch.no_grad():
        for n, t in tuners(ours).items():
            l = t.l_in if t.l_in is not None else t.l_out
            l.copy_(torch.exp(0.2 * torch.randn(l.shape, generator=g)))
            layer = theirs.base_model.model.get_submodule(n)
            assert layer.is_feedforward == (t.l_in is not None)
            layer.ia3_l['default'].copy_(l.view_as(layer.ia3_l['default']))
            found += 1
    assert found == 18
    theirs.eval(); ours.eval()
    with torch.no_grad():
        y0, y1, y2 = base(**x).logits, ours(**x).logits, theirs(**x).logits
    assert not torch.allclose(y0, y1, atol=1e-3)          # the vectors do something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
