"""PEFT's RandLoRA adapter files against HF PEFT, both ways, on layers of one shape: PEFT draws one pair of bases from
`projection_prng_key` (for the largest layer, sliced), and for one shape that is our pair drawn from the same seed.
Layers of several shapes, sparse bases, and saved bases that the seed does not regenerate are named, and leave the
model untouched."""
import copy, json
import pytest, torch
from peft import RandLoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from subspace_nb.peft_adapters import load_peft_adapter, save_peft_adapter, peft_config, PEFT_CONFIG, PEFT_WEIGHTS
from subspace_nb.inject import apply_tuning
from subspace_nb.models import tiny_model
from test_peft_roundtrips import moved, snapshot, untouched, peft_to_ours, ours_to_peft

QV = ['query', 'value']                                           # 32 -> 32 on the tiny BERT: one shape


@pytest.mark.parametrize('save_projection', [True, False])
def test_peft_to_ours(save_projection, tmp_path):
    cfg = RandLoraConfig(r=4, randlora_alpha=8, projection_prng_key=5, save_projection=save_projection, target_modules=QV)
    ours, _ = peft_to_ours(tiny_model('bert'), cfg, tmp_path)
    assert ours.subspace['method'] == 'randlora' and ours.subspace['hp'] == dict(r=4, alpha=8.0, bases='peft') and ours.subspace['seed'] == 5


def test_ours_to_peft(tmp_path):
    base = tiny_model('bert')
    mine = moved(apply_tuning(copy.deepcopy(base), 'randlora', targets=QV, r=4, alpha=8.0, bases='peft', seed=3), seed=1)
    path, _, _ = ours_to_peft(base, mine, tmp_path)
    assert json.loads((path / PEFT_CONFIG).read_text()) == peft_config(mine)


def test_several_shapes_are_named(tmp_path):
    base = tiny_model('bert')
    three = QV + ['intermediate.dense']                           # 32 -> 37 too
    get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=three)).save_pretrained(tmp_path)
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match='randlora adapter on layers of several shapes'): load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)
    with pytest.raises(ValueError, match='randlora on layers of several shapes'):
        save_peft_adapter(apply_tuning(copy.deepcopy(base), 'randlora', targets=three, r=4, bases='peft'), tmp_path / 'ours')
    assert not (tmp_path / 'ours').exists()


def test_sparse_and_foreign_bases_are_named(tmp_path):
    base = tiny_model('bert')
    get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, sparse=True, target_modules=QV)).save_pretrained(tmp_path / 's')
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match='sparse=True is not supported'): load_peft_adapter(model, tmp_path / 's')
    assert untouched(model, snap)
    get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=QV)).save_pretrained(tmp_path / 'f')
    sd = load_file(str(tmp_path / 'f' / PEFT_WEIGHTS))
    save_file(dict(sd, **{'base_model.randlora_A': sd['base_model.randlora_A'] * 2}), str(tmp_path / 'f' / PEFT_WEIGHTS))
    with pytest.raises(ValueError, match='are not the ones projection_prng_key=0 regenerates'):
        load_peft_adapter(model, tmp_path / 'f')
    assert untouched(model, snap)
