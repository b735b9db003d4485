"""PEFT's adapter files for the catalogue's methods (`PEFT_TABLE` in nbs/34_peft_adapters) against HF PEFT (a test-only
dependency), both ways on a tiny BERT: PEFT makes and saves an adapter with moved weights -> ours loads it and computes
PEFT's outputs; ours, moved, saves -> `PeftModel.from_pretrained` computes ours. A refused field is named, and leaves
the model untouched."""
import copy, json
import pytest, torch
import peft
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from subspace_nb.peft_adapters import load_peft_adapter, save_peft_adapter, peft_config, PEFT_CONFIG, PEFT_WEIGHTS
from subspace_nb.inject import apply_tuning, tuners
from subspace_nb.models import tiny_model, tiny_batch
from test_peft_roundtrips import logits, changes, moved, snapshot, untouched
from subspace_nb.studies.bench import peft_boft_without_cuda

peft_boft_without_cuda()          # PEFT's BOFT keeps all its butterfly factors on CPU

QV, THREE = ['query', 'value'], ['query', 'value', 'intermediate.dense']   # 32 -> 32, and 32 -> 37: two shapes

CASES = {   # method: (PEFT's config, our hyper-parameters and targets, what ours reads back)
    'oft': (lambda: peft.OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False, target_modules=THREE),
            dict(block_size=8, targets=THREE), dict(block_size=8, coft=False, eps=6e-5)),
    'boft': (lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=THREE),
             dict(block_size=4, factors=2, targets=THREE), dict(block_size=4, factors=2)),     # n = 32 on each
    'hra': (lambda: peft.HRAConfig(r=4, target_modules=THREE), dict(r=4, targets=THREE), dict(r=4)),
    'delora': (lambda: peft.DeloraConfig(r=4, delora_lambda=3, target_modules=THREE), dict(r=4, lam=3.0, targets=THREE),
               dict(r=4, lam=3.0)),
    'road': (lambda: peft.RoadConfig(variant='road_1', group_size=8, target_modules=QV), dict(group_size=8, targets=QV),
             dict(group_size=8)),
    'loha': (lambda: peft.LoHaConfig(r=2, alpha=6, target_modules=THREE), dict(r=2, alpha=6.0, targets=THREE),
             dict(r=2, alpha=6.0)),
    'lokr': (lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=THREE), dict(r=2, alpha=6.0, targets=THREE),
             dict(r=2, alpha=6.0, factor=-1)),
    'fourierft': (lambda: peft.FourierFTConfig(n_frequency=50, scaling=3.0, random_loc_seed=5, target_modules=THREE),
                  dict(n_frequency=50, scale=3.0, loc_seed=5, targets=THREE), dict(n_frequency=50, scale=3.0, loc_seed=5)),
    'miss': (lambda: peft.MissConfig(r=4, target_modules=THREE), dict(r=4, targets=THREE), dict(r=4, mini_r=None)),
    'miss-mini': (lambda: peft.MissConfig(r=4, init_weights='mini', mini_r=8, target_modules=QV),
                  dict(r=4, mini_r=8, targets=QV), dict(r=4, mini_r=8)),
    'shira': (lambda: peft.ShiraConfig(r=2, random_seed=7, target_modules=THREE), dict(r=2, targets=THREE), dict(r=2)),
    'c3a': (lambda: peft.C3AConfig(block_size=8, init_weights='xavier_uniform', target_modules=QV),
            dict(block_size=8, targets=QV), dict(block_size=8)),            # 37 is prime: no block fits the FFN layer
    'vblora': (lambda: peft.VBLoRAConfig(r=2, num_vectors=6, vector_length=8, topk=2, target_modules=QV),
               dict(r=2, num_vectors=6, vector_length=8, targets=QV), dict(r=2, num_vectors=6, vector_length=8, topk=2)),
    'psoft': (lambda: peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=THREE), dict(r=4, targets=THREE), dict(r=4)),
}
METHOD = lambda case: case.split('-')[0]


@pytest.mark.parametrize('name', list(CASES))
def test_peft_to_ours(name, tmp_path):
    cfg, _, hp = CASES[name]
    base = tiny_model('bert')
    pm = moved(get_peft_model(copy.deepcopy(base), cfg()))
    pm.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    y = logits(pm)
    assert changes(y, logits(base))
    torch.testing.assert_close(logits(ours), y, rtol=1e-5, atol=1e-5)
    assert ours.subspace['method'] == METHOD(name) and ours.subspace['hp'] == hp and len(tuners(ours)) == len(pm.targeted_module_names)


@pytest.mark.parametrize('name', list(CASES))
def test_ours_to_peft(name, tmp_path):
    _, hp, _ = CASES[name]
    base = tiny_model('bert')
    mine = moved(apply_tuning(copy.deepcopy(base), METHOD(name), seed=3, **hp), seed=1)
    path = save_peft_adapter(mine, tmp_path)
    assert json.loads((path / PEFT_CONFIG).read_text()) == peft_config(mine)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path)
    y = logits(mine)
    assert changes(y, logits(base))
    torch.testing.assert_close(logits(pm), y, rtol=1e-5, atol=1e-5)
    back = load_peft_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(logits(back), y, rtol=1e-6, atol=1e-6)
    assert type(peft.get_peft_config(peft_config(mine))).__name__.lower().startswith(name[:3])   # the benchmark's twin
    if METHOD(name) == 'shira':                                       # the positions travel with the values
        for n, t in tuners(back).items(): assert torch.equal(t.idx, tuners(mine)[n].idx)


@pytest.mark.parametrize('name, field, value', [('oft', 'use_cayley_neumann', True), ('oft', 'block_share', True),
                                                ('boft', 'boft_block_num', 4), ('boft', 'boft_dropout', 0.1),
                                                ('boft', 'bias', 'boft_only'),
                                                ('hra', 'apply_GS', True), ('road', 'variant', 'road_2'),
                                                ('lokr', 'decompose_both', True), ('delora', 'lambda_pattern', {'query': 2}),
                                                ('fourierft', 'n_frequency_pattern', {'query': 9}),
                                                ('miss', 'init_weights', 'bat'), ('c3a', 'block_size_pattern', {'query': 4}),
                                                ('vblora', 'save_only_topk_weights', True),
                                                ('vblora', 'vblora_dropout', 0.1), ('vblora', 'fan_in_fan_out', True),
                                                ('psoft', 'ab_svd_init', 'pissa_init'), ('psoft', 'psoft_svd', 'lowrank'),
                                                ('psoft', 'psoft_orth', False), ('psoft', 'psoft_mag_b', False),
                                                ('psoft', 'use_cayley_neumann', True)])
def test_refused_field_is_named(name, field, value, tmp_path):
    base = tiny_model('bert')
    get_peft_model(copy.deepcopy(base), CASES[name][0]()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    (tmp_path / PEFT_CONFIG).write_text(json.dumps(dict(cfg, **{field: value})))
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"): load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)


def test_tensors_checked_against_our_tuners(tmp_path):
    "A tensor of the wrong size, or a DeLoRA weight norm of another base model: named, and the model left as it was."
    base = tiny_model('bert')
    get_peft_model(copy.deepcopy(base), CASES['delora'][0]()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / PEFT_WEIGHTS))
    k = next(k for k in sd if k.endswith('query.delora_w_norm'))
    save_file(dict(sd, **{k: sd[k] * 1.1}), str(tmp_path / PEFT_WEIGHTS))
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match='the saved w_norm is not the one this model'): load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)
    get_peft_model(copy.deepcopy(base), CASES['hra'][0]()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / PEFT_WEIGHTS))
    k = next(k for k in sd if k.endswith('value.hra_u'))
    save_file(dict(sd, **{k: sd[k][:, :3].contiguous()}), str(tmp_path / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match=r'value does not fit \(u: saved \(32, 3\), ours \(32, 4\)'):
        load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)


def test_no_peft_form_is_refused_on_save(tmp_path):
    base = tiny_model('bert')
    for name, hp, says in [('oft', dict(block_size=8, side='out'), "side='out' has no PEFT form"),
                           ('fourierft', dict(n_frequency=8), 'loc_seed=None has no PEFT form')]:
        with pytest.raises(ValueError, match=says): save_peft_adapter(apply_tuning(copy.deepcopy(base), name, **hp), tmp_path / name)
        assert not (tmp_path / name).exists()


def test_gpt2_conv1d(tmp_path):
    "GPT-2's Conv1D layers: FourierFT (the one table method PEFT tunes them with) both ways; another is refused on save."
    base, x = tiny_model('gpt2'), tiny_batch()
    out = lambda m: m.eval()(**x, output_hidden_states=True).hidden_states[-1].detach()
    cfg = peft.FourierFTConfig(n_frequency=20, scaling=3.0, random_loc_seed=3, target_modules=['c_attn'], fan_in_fan_out=True)
    pm = moved(get_peft_model(copy.deepcopy(base), cfg))
    pm.save_pretrained(tmp_path / 'theirs')
    torch.testing.assert_close(out(load_peft_adapter(copy.deepcopy(base), tmp_path / 'theirs')), out(pm), rtol=1e-5, atol=1e-5)
    mine = moved(apply_tuning(copy.deepcopy(base), 'fourierft', targets=['c_attn'], n_frequency=20, scale=3.0, loc_seed=3), 1)
    assert changes(out(mine).flatten(), out(base).flatten())
    back = PeftModel.from_pretrained(copy.deepcopy(base), save_peft_adapter(mine, tmp_path / 'ours'))
    torch.testing.assert_close(out(back), out(mine), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="PEFT's HRA does not tune Conv1D layers"):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'hra', targets=['c_attn'], r=2), tmp_path / 'hra')


def test_vblora_bank_travels_once(tmp_path):
    "VB-LoRA's one bank: PEFT's base_model.vblora_vector_bank is our first tuned layer's vblora_shared.bank_0, both ways; "
    "without it, or with a second group (share='shape'), nothing happens."
    base = tiny_model('bert')
    pm = moved(get_peft_model(copy.deepcopy(base), CASES['vblora'][0]()))
    pm.save_pretrained(tmp_path / 'theirs')
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / 'theirs')
    first = ours.subspace['layers'][0]
    assert torch.equal(ours.state_dict()[f'{first}.vblora_shared.bank_0'], pm.base_model.vblora_vector_bank['default'])
    sd = load_file(str(tmp_path / 'theirs' / PEFT_WEIGHTS))
    save_file({k: v for k, v in sd.items() if 'vector_bank' not in k}, str(tmp_path / 'theirs' / PEFT_WEIGHTS))
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match='holds the shared base_model.vblora_vector_bank'): load_peft_adapter(model, tmp_path / 'theirs')
    assert untouched(model, snap)
    with pytest.raises(ValueError, match="share='shape' has no PEFT form"):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'vblora', targets=THREE, r=2, num_vectors=6, vector_length=1,
                                       share='shape'), tmp_path / 'shape')
    assert not (tmp_path / 'shape').exists()


def test_boft_width_must_fit_the_butterfly(tmp_path):
    "A layer whose width is not a multiple of b 2^(f-1) (37 inputs of the tiny BERT's FFN output): ours takes fewer or "
    "smaller blocks there, PEFT refuses it; both ways the layer and the numbers are named, nothing written or touched."
    base = tiny_model('bert')
    with pytest.raises(ValueError, match=r"output.dense.*37 inputs, not a multiple of .* = 4 \* 2\^1 = 8"):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'boft', targets=['output.dense'], block_size=4, factors=2),
                          tmp_path / 'ours')
    assert not (tmp_path / 'ours').exists()
    get_peft_model(copy.deepcopy(base), CASES['boft'][0]()).save_pretrained(tmp_path / 'theirs')
    cfg = json.loads((tmp_path / 'theirs' / PEFT_CONFIG).read_text())
    layer = 'bert.encoder.layer.0.output.dense'                # as if PEFT had tuned it: full blocks, one s per output
    (tmp_path / 'theirs' / PEFT_CONFIG).write_text(json.dumps(dict(cfg, target_modules=[layer])))
    save_file({f'base_model.model.{layer}.boft_R': torch.zeros(2, 8, 4, 4), f'base_model.model.{layer}.boft_s': torch.ones(32, 1)},
              str(tmp_path / 'theirs' / PEFT_WEIGHTS))
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match=f"layer {layer} has 37 inputs, not a multiple of"): load_peft_adapter(model, tmp_path / 'theirs')
    assert untouched(model, snap)


def test_boft_blocks_are_the_skew_part(tmp_path):
    "PEFT's boft_R need not be skew: its Cayley uses (A - A^T)/2, and so does our q read from it; written back, Q whole."
    base = tiny_model('bert')
    pm = get_peft_model(copy.deepcopy(base), CASES['boft'][0]())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'boft_R' in n: p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))   # not skew
    pm.save_pretrained(tmp_path / 'theirs')
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path / 'theirs')
    torch.testing.assert_close(logits(ours), logits(pm), rtol=1e-5, atol=1e-5)
    sd = load_file(str(save_peft_adapter(ours, tmp_path / 'ours') / PEFT_WEIGHTS))
    R = next(v for k, v in sd.items() if k.endswith('boft_R'))
    torch.testing.assert_close(R, -R.mT)                              # skew, as written
