"""Two CPU processes (torchrun, gloo) train the same tuning with SubspaceTrainer: the tuner tensors stay identical on
both ranks, and the saved tuning loads into a fresh model and computes what rank 0's model computed."""
import os, sys, subprocess
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from subspace_nb import load_tuning, tiny_model, tiny_batch, tuners

WORKER = Path(__file__).with_name('ddp_worker.py')


@pytest.mark.parametrize('method', ['lora', 'ssb', 'fish-mask', 'prompt-tuning'])
def test_two_process_ddp(method, tmp_path):
    env = os.environ | dict(TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(WORKER), str(tmp_path), method], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r0, r1 = load_file(str(tmp_path / 'rank0.safetensors')), load_file(str(tmp_path / 'rank1.safetensors'))
    assert r0.keys() == r1.keys() and r0
    for k in r0: assert torch.equal(r0[k], r1[k]), f"{method}: {k} differs between the ranks"
    m = load_tuning(tiny_model('bert'), tmp_path / 'tuning').eval()
    with torch.no_grad(): y = m(**tiny_batch()).logits
    torch.testing.assert_close(y, load_file(str(tmp_path / 'logits.safetensors'))['logits'], rtol=0, atol=1e-6)
    moved = [k for k, v in r0.items() if 'classifier' not in k]
    assert moved, 'the tuning has tensors of its own'
    if method == 'fish-mask':                                            # masks chosen from data, the same on both ranks
        assert all(bool(t.chosen) for t in tuners(m).values())
