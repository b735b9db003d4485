"""One rank of a 2-process CPU DDP run (torchrun, gloo) of SubspaceTrainer on a tiny BERT; used by test_ddp.py.

Each rank writes its tuner tensors after training; rank 0 also saves the tuning and its logits on a fixed batch.

Teardown is torch's, and both of its ways are racy under load: a gloo group still alive at interpreter exit can abort
a rank ("terminate called without an active exception"), and `destroy_process_group` can hang (pytorch#75097). So
once a monitored barrier says both ranks are past every collective (or names the one that is not), each rank leaves
with `os._exit(0)`, its files written. A hang anywhere dumps every thread's stack to stderr before the test's
timeout, so a failure says where it stood."""
import sys, os, faulthandler
from datetime import timedelta
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from subspace_nb import apply_tuning, tuning_state, save_tuning, SubspaceTrainer, tiny_model, tiny_batch, TinyRows


def main(out, method):
    out = Path(out)
    rank = int(os.environ['RANK'])
    hp = dict(density=0.05) if method == 'fish-mask' else {}
    m = apply_tuning(tiny_model('bert'), method, **hp)
    args = TrainingArguments(str(out / 'run'), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], save_strategy='no', logging_strategy='no', disable_tqdm=True,
                             use_cpu=True, ddp_backend='gloo', seed=0)
    tr = SubspaceTrainer(model=m, args=args, train_dataset=TinyRows(32))
    tr.train()
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    save_file(tuning_state(m), str(out / f'rank{rank}.safetensors'))
    if rank == 0:
        save_tuning(m, out / 'tuning')
        m.eval()
        with torch.no_grad(): save_file({'logits': m(**tiny_batch()).logits.contiguous()}, str(out / 'logits.safetensors'))
    torch.distributed.monitored_barrier(timeout=timedelta(seconds=300))
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)


if __name__ == '__main__':
    faulthandler.dump_traceback_later(480, exit=True)      # the test waits 600 s
    main(*sys.argv[1:])
