"""DistributedDataParallel(sessa_compiler.compile(m)) trains: gloo on CPU, world size 2 on 127.0.0.1.

Each rank runs one training step with the compiled module under DDP and the same step with the
uncompiled module under DDP; the all-reduced gradients must agree, and so must the weights after the
optimiser step (the compiled module reads them live at the next call)."""
import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(module, x, lr=0.05):
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    opt.zero_grad()
    module(x).square().mean().backward()
    grads = {k.removeprefix("module.").removeprefix("_orig_mod."): p.grad.clone()
             for k, p in module.named_parameters()}
    opt.step()
    return grads


def _worker(rank: int, port: int, out_dir: str, backends: tuple) -> None:
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for backend in backends:   # one process group, a fresh pair of modules per backend
            torch.manual_seed(rank + 10)  # different initial weights per rank: DDP broadcasts rank 0's
            plain = SessaLayer(16, n_heads=2, n_kv_heads=1)
            mine = SessaLayer(16, n_heads=2, n_kv_heads=1)
            torch.manual_seed(0)
            ref = SessaLayer(16, n_heads=2, n_kv_heads=1)
            if rank == 0:
                plain.load_state_dict(ref.state_dict())
                mine.load_state_dict(ref.state_dict())
            x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own batch
            compiled = DDP(sc.compile(mine, backend=backend))
            uncompiled = DDP(plain)
            got = _step(compiled, x)
            want = _step(uncompiled, x)
            with torch.no_grad():
                after = (compiled(x), uncompiled(x))
            torch.save({"got": got, "want": want, "after": after}, f"{out_dir}/{backend}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# eager, and tvm (its own training runner: core ops as autograd.Functions, backends/training.py; each rank
# pays a TVM build), in one pair of processes. Triton's backward by recomputation is tested against autograd in
# tests/test_autograd.py
BACKENDS = ("eager", "tvm")


def test_ddp_of_a_compiled_module_matches_uncompiled_ddp(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), BACKENDS), nprocs=WORLD, join=True,
                       start_method="spawn")
    from sessa_compiler.api import relative_error

    for backend in BACKENDS:
        results = [torch.load(tmp_path / f"{backend}-rank{r}.pt") for r in range(WORLD)]
        for res in results:
            assert res["got"].keys() == res["want"].keys() and res["got"], backend
            for k in res["want"]:
                assert relative_error(res["got"][k], res["want"][k]) <= 1e-4, (backend, k)
            assert relative_error(res["after"][0], res["after"][1]) <= 1e-4, backend
        for k in results[0]["got"]:  # all-reduced: every rank holds the same gradient
            assert torch.allclose(results[0]["got"][k], results[1]["got"][k], rtol=0, atol=1e-6), (backend, k)
