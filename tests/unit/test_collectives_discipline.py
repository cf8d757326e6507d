"""Every collective and point-to-point call of the package goes through megatron_rlp.collectives.

On GPUs the training groups are NCCL, which takes no host tensors; the helper module builds its
tensors on the platform's device and, in strict mode, refuses host tensors.  A direct
torch.distributed call elsewhere bypasses both, so this test walks the source with ``ast``.
"""
import ast
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# the helper itself, and the CPU shim's strict mode, which wraps torch.distributed to check calls
ALLOWED = {ROOT / "megatron_rlp" / "collectives.py", ROOT / "megatron_rlp" / "platform.py"}
COMMUNICATION = frozenset({
    "barrier", "monitored_barrier", "all_reduce", "all_reduce_coalesced", "reduce", "broadcast",
    "broadcast_object_list", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "_all_gather_base", "all_gather_single", "gather", "gather_object",
    "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "P2POp", "send_object_list", "recv_object_list",
})
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def direct_communication(source: str) -> list[tuple[int, str]]:
    """(line, what) of every direct torch.distributed collective / p2p use in ``source``."""
    tree = ast.parse(source)
    aliases = set(DIST_MODULES)  # names bound to torch.distributed (or its c10d module)
    imported = {}  # local name -> collective imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COMMUNICATION:
                    imported[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COMMUNICATION and _dotted(node.value) in aliases:
            found.append((node.lineno, f"{_dotted(node.value)}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in imported and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, f"{imported[node.id]} (imported from torch.distributed)"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and _dotted(node.args[0]) in aliases
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in COMMUNICATION):
            found.append((node.lineno, f"getattr({_dotted(node.args[0])}, {node.args[1].value!r})"))
        elif isinstance(node, ast.ImportFrom) and node.module in DIST_MODULES:
            found.extend((node.lineno, f"from {node.module} import {a.name}")
                         for a in node.names if a.name in COMMUNICATION)
    return sorted(set(found))


def _sources():
    for folder in ("megatron_rlp", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path not in ALLOWED:
                yield path


def test_package_and_tools_communicate_only_through_collectives():
    offenders = []
    for path in _sources():
        for line, what in direct_communication(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, (
        "direct torch.distributed collectives bypass megatron_rlp.collectives (device placement and "
        "the strict device check); call the helper there instead:\n  " + "\n  ".join(offenders)
    )
    assert any(True for _ in _sources()), "no sources found: the walk itself is broken"


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\ndist.all_reduce(x)",
    "import torch\ntorch.distributed.barrier()",
    "import torch.distributed as d\nwork = d.isend(t, 1)",
    "from torch import distributed as dist\ndist.broadcast_object_list(box, src=0)",
    "from torch.distributed import all_gather_into_tensor as agit\nagit(o, i)",
    "import torch.distributed as dist\nf = getattr(dist, 'all_gather_single', None)",
    "from torch.distributed import distributed_c10d as c10d\nc10d.recv(t, 0)",
    "import torch.distributed as dist\nreduce = dist.reduce_scatter_tensor",
])
def test_checker_finds_direct_calls(snippet):
    assert direct_communication(textwrap.dedent(snippet)), snippet


def test_checker_allows_queries_and_the_helper():
    src = ("import torch.distributed as dist\nfrom megatron_rlp import collectives\n"
           "r = dist.get_rank(); w = dist.get_world_size(group=g)\ncollectives.all_reduce(x, group=g)\n"
           "dist.init_process_group('gloo'); dist.destroy_process_group()\n")
    assert direct_communication(src) == []
