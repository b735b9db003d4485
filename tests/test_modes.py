"""The mode detector (nbs/78_mode_detector): each family recognised on made-up matrices and its near misses rejected,
and a few registered methods, a composition included, detected as declared."""
import math, pytest, torch
from subspace_nb.studies.modes import mode_of, detect, detected_taxonomy, mode_tolerance

G = torch.Generator().manual_seed(0)
def rn(*shape): return torch.randn(*shape, generator=G, dtype=torch.float64)
def rot(d): A = rn(d, d); return torch.linalg.matrix_exp(0.1 * (A - A.T))

def made_up(m, n):
    W = rn(m, n).float().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    D1, D2, L = 1 + 0.1 * rn(m), 1 + 0.1 * rn(n), 0.1 * rn(m, 3) @ rn(3, n)
    mode1 = (U * (S * (1 + 0.1 * rn(len(S))))) @ Vh
    return W, [('mode1', mode1), ('mode2', D1[:, None] * W * D2), ('rotation', rot(m) @ W), ('rotation', W @ rot(n)),
               ('extension', W + L), ('combination', D1[:, None] * W * D2 + L), ('combination', rot(m) @ W + L),
               ('combination', mode1 + L), ('mode3', W + 0.1 * rn(m, n))]


@pytest.mark.parametrize('shape', [(32, 32), (37, 32), (16, 24)])
def test_families_and_near_misses(shape):
    W, known = made_up(*shape)
    assert mode_of(W.float(), W.float())['mode'] == 'unchanged'
    for mode, X in known:
        assert mode_of(X.float(), W.float())['mode'] == mode
        near = X + 1e-3 * X.norm() * rn(*shape) / math.sqrt(X.numel())     # 0.1 % off the family
        assert mode_of(near.float(), W.float())['mode'] == 'mode3', mode


def test_tolerance_knows_the_dtype():
    W = rn(8, 8).float()
    assert mode_tolerance(W.bfloat16(), W) > 1000 * mode_tolerance(W, W)
    X = W * (1 + 1e-3 * rn(8).float())                    # 1e-3 is rounding noise in bf16, not in float32
    assert mode_of(X.bfloat16(), W)['mode'] == 'unchanged'
    assert mode_of(X, W)['mode'] == 'mode2'


def test_bad_input():
    W = rn(8, 6)
    with pytest.raises(ValueError, match='same shape'): mode_of(W[:4], W)
    with pytest.raises(ValueError, match='max_rank=0'): mode_of(W, W, max_rank=0)
    with pytest.raises(ValueError, match="expected 'markdown' or 'rows'"): detected_taxonomy('html')


def test_registry_rows():
    rows = {r['method']: r for r in detected_taxonomy('rows', methods=['ia3', 'lora', 'ia3,lora', 'prefix-tuning'])}
    assert [rows[n]['detected'] for n in ('ia3', 'lora', 'ia3,lora')] == ['mode2', 'extension', 'combination']
    assert all(rows[n]['agrees'] == 'yes' for n in ('ia3', 'lora', 'ia3,lora'))
    assert rows['prefix-tuning']['detected'] == 'not a weight map'
    assert detect('svdiff')['detected'] == 'mode1'                          # declared combination: a finding
