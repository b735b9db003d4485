"""One rank of a 2-process CPU DDP run (torchrun, gloo) of SubspaceTrainer on a tiny BERT; used by test_ddp.py.

Each rank writes its tuner tensors after training; rank 0 also saves the tuning and its logits on a fixed batch. The
process group is destroyed before the interpreter exits: a gloo group left alive can abort a rank at shutdown
("terminate called without an active exception") after all its work is done."""
import sys, os
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
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == '__main__': main(*sys.argv[1:])
