import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rlp.models.builder import build_gpt_model, transformer_config
from megatron_rlp.models.presets import get_preset


def test_tp2_forward_gathers_full_vocab(model_parallel):
    model_parallel(tp=2, pp=1)
    preset = get_preset("tiny")
    model = build_gpt_model(preset, transformer_config(preset, tp=2))
    ids = torch.arange(12).reshape(1, 12) % preset.vocab_size
    logits = model(ids, torch.arange(12)[None], None)
    full = gather_from_tensor_model_parallel_region(logits)
    assert full.shape[-1] == preset.vocab_size
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    other = [torch.zeros_like(full) for _ in range(2)]
    dist.all_gather(other, full)
    torch.testing.assert_close(other[0], other[1])


def test_reinitialising_does_not_pile_up_process_groups():
    # megatron-core's destroy_model_parallel only forgets its groups; each gloo group keeps
    # threads and sockets, and a test process that re-initialised ~50 times ran 16x slower.
    from megatron_rlp.training import parallel

    parallel.destroy()
    base = len(parallel._live_groups())
    for tp, pp in ((2, 1), (1, 2), (1, 1), (2, 1)):
        parallel.init_model_parallel(tp, pp)
        assert len(parallel._live_groups()) > base
        dist.all_reduce(torch.ones(1), group=parallel_state.get_tensor_model_parallel_group())
        parallel.destroy()
        assert len(parallel._live_groups()) == base
