"""PEFT's LN-tuning adapter files against HF PEFT, both ways: LayerNorm gains and biases (tiny BERT) and RMSNorm gains
(tiny LLaMA). PEFT's file holds a trained copy of each targeted module; ours trains the norm layers' own parameters.
A targeted module that is not a norm layer is named, and leaves the model untouched."""
import copy, json
import pytest, torch
from peft import LNTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from subspace_nb.peft_adapters import load_peft_adapter, peft_config, PEFT_CONFIG, PEFT_WEIGHTS
from subspace_nb.inject import apply_tuning
from subspace_nb.models import tiny_model
from test_peft_roundtrips import moved, snapshot, untouched, peft_to_ours, ours_to_peft

NORMS = {'bert': ['LayerNorm'], 'llama': ['input_layernorm', 'post_attention_layernorm']}


@pytest.mark.parametrize('arch', list(NORMS))
def test_peft_to_ours(arch, tmp_path):
    ours, pm = peft_to_ours(tiny_model(arch), LNTuningConfig(target_modules=NORMS[arch]), tmp_path)
    assert ours.subspace['method'] == 'ln-tuning' and len(ours.subspace['layers']) == len(pm.targeted_module_names)


@pytest.mark.parametrize('arch', list(NORMS))
def test_ours_to_peft(arch, tmp_path):
    base = tiny_model(arch)
    mine = moved(apply_tuning(copy.deepcopy(base), 'ln-tuning', targets=NORMS[arch]), seed=1)
    path, _, _ = ours_to_peft(base, mine, tmp_path)
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    assert cfg == peft_config(mine) and cfg['peft_type'] == 'LN_TUNING'


def test_not_a_norm_is_named(tmp_path):
    "PEFT's LN tuning copies any module; a linear layer in its file is named, and the model stays as it was."
    base = tiny_model('bert')
    get_peft_model(copy.deepcopy(base), LNTuningConfig(target_modules=['query'])).save_pretrained(tmp_path)
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match=r'query \(Linear\)\] are not norm layers|query \(Linear\).*are not norm layers'):
        load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)


def test_wrong_size_is_named(tmp_path):
    base = tiny_model('bert')
    get_peft_model(copy.deepcopy(base), LNTuningConfig(target_modules=['LayerNorm'])).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / PEFT_WEIGHTS))
    k = next(k for k in sd if k.endswith('ln_tuning_layers.bias'))
    save_file(dict(sd, **{k: sd[k][:-1].contiguous()}), str(tmp_path / PEFT_WEIGHTS))
    model = copy.deepcopy(base); snap = snapshot(model)
    with pytest.raises(ValueError, match='does not fit this model.s norm layers'): load_peft_adapter(model, tmp_path)
    assert untouched(model, snap)
