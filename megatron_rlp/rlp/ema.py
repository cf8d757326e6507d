"""The EMA teacher φ that scores the no-think baseline p̄_φ(x_t | x_<t) (RLP_SPEC.md "Roles").

    lazy initialisation:         φ ← θ on the first batch
    after every optimizer step:  φ ← τ·φ + (1 − τ)·θ,   τ = 0.999 by default

φ is a fp32 shadow of every parameter of the local model chunks.  Each rank keeps only its own
shard of θ, so the teacher is sharded exactly like θ (TP, PP and virtual PP alike) and needs no
communication.  fp32 matters: with τ = 0.999 the per-step change (1 − τ)(θ − φ) is far below bf16
resolution, so a bf16 EMA would never move (DESIGN.md, "One RLP iteration", step 5).

The teacher forward reuses the policy's modules: :meth:`EMATeacher.swap_into` loads φ into the
parameters for the duration of a ``with`` block and restores θ bitwise afterwards.

No megatron imports and no global state; the only distributed call is the optional all-reduce in
:meth:`EMATeacher.gap`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Optional, Sequence

import torch

__all__ = ["EMATeacher", "named_parameters_of", "validate_decay"]


def validate_decay(decay: float) -> float:
    """Return ``decay`` as a float if 0 < τ < 1, else raise a ValueError naming the flag."""
    try:
        tau = float(decay)
    except (TypeError, ValueError):
        raise ValueError(f"--rlp-ema-decay must be a number in (0, 1); got {decay!r}") from None
    if not (0.0 < tau < 1.0) or math.isnan(tau):
        raise ValueError(
            f"--rlp-ema-decay must lie strictly between 0 and 1 (the paper uses 0.999); got {decay!r}"
        )
    return tau


def named_parameters_of(modules: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) over a list of model chunks; names are ``"{chunk}.{parameter name}"``.

    ``named_parameters`` yields a parameter shared inside one chunk (tied embeddings on a
    single-stage model) only once; on separate pipeline stages megatron keeps separate copies,
    which each get their own shadow — as θ has.
    """
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    for idx, module in enumerate(modules):
        for name, param in module.named_parameters():
            yield f"{idx}.{name}", param


class EMATeacher:
    """fp32 shadow parameters φ for a list of (megatron) model chunks.

    Typical use in a training loop::

        teacher = EMATeacher()
        teacher.maybe_initialize(model)          # first batch: φ ← θ
        with teacher.swap_into(model):           # teacher forward with the policy's code
            s_ema = ...
        ... optimizer.step() ...
        teacher.update(model, decay=0.999)       # φ ← τφ + (1 − τ)θ
    """

    def __init__(self) -> None:
        self._shadow: Optional[dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------ state
    @property
    def initialized(self) -> bool:
        return self._shadow is not None

    def num_parameters(self) -> int:
        """Number of scalar parameters held locally (0 before initialisation)."""
        return 0 if self._shadow is None else sum(t.numel() for t in self._shadow.values())

    def shadow(self, name: str) -> torch.Tensor:
        """The fp32 shadow of one parameter, by its ``"{chunk}.{name}"`` key (read-only view)."""
        self._require_initialized("shadow")
        return self._shadow[name]

    def _require_initialized(self, what: str) -> None:
        if self._shadow is None:
            raise RuntimeError(
                f"EMATeacher.{what}() called before the teacher was initialised; call "
                "maybe_initialize(modules) (or load_state_dict) first"
            )

    def _paired(self, modules) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        params = list(named_parameters_of(modules))
        names = {n for n, _ in params}
        missing = names - self._shadow.keys()
        extra = self._shadow.keys() - names
        if missing or extra:
            raise KeyError(
                "EMA teacher and model parameters differ: "
                f"missing in teacher {sorted(missing)[:5]}, not in model {sorted(extra)[:5]}"
            )
        pairs = []
        for name, p in params:
            s = self._shadow[name]
            if s.shape != p.shape:
                raise ValueError(
                    f"EMA shadow of {name} has shape {tuple(s.shape)}, parameter {tuple(p.shape)}"
                )
            pairs.append((name, p, s))
        return pairs

    # ------------------------------------------------------------- algorithm
    @torch.no_grad()
    def maybe_initialize(self, modules) -> bool:
        """φ ← θ if the teacher has no state yet (spec, Algorithm step 3).  Returns True if it did."""
        if self._shadow is not None:
            return False
        self._shadow = {
            name: p.detach().to(dtype=torch.float32, copy=True) for name, p in named_parameters_of(modules)
        }
        return True

    @torch.no_grad()
    def update(self, modules, decay: float) -> None:
        """φ ← τ·φ + (1 − τ)·θ in fp32, after the optimizer step (spec, Algorithm step 6).

        θ is read from the module parameters (fp32 or bf16; cast to fp32 before mixing).
        """
        tau = validate_decay(decay)
        self._require_initialized("update")
        for _, p, s in self._paired(modules):
            s.mul_(tau).add_(p.detach().to(device=s.device, dtype=torch.float32), alpha=1.0 - tau)

    @contextlib.contextmanager
    def swap_into(self, modules):
        """Temporarily load φ (cast to each parameter's dtype) into the modules' parameters.

        θ is saved first and copied back on exit, bitwise, even if the block raises.  Parameters are
        overwritten in place (``param.data.copy_``) so views into megatron's contiguous parameter
        buffers stay valid.  Gradients are not touched; run the teacher forward under no_grad.
        """
        self._require_initialized("swap_into")
        pairs = self._paired(modules)
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for _, p, s in pairs:
                    saved.append((p, p.detach().clone()))
                    p.data.copy_(s.to(device=p.device, dtype=p.dtype))
            yield self
        finally:
            with torch.no_grad():
                for p, theta in saved:
                    p.data.copy_(theta)

    @torch.no_grad()
    def gap(
        self,
        modules,
        group=None,
        include_replicated: bool = True,
    ) -> float:
        """Relative distance ‖θ − φ‖ / ‖θ‖ over all parameters (a health metric, ``rlp/ema_gap``).

        Args:
            modules: the local model chunks.
            group: optional process group over which the two squared sums are all-reduced; pass the
                model-parallel group (TP × PP) so each rank reports the whole model.  Do not reduce
                over data-parallel ranks: there the parameters are replicated.
            include_replicated: when False, only parameters marked ``tensor_model_parallel`` (sharded
                over TP by megatron) are counted.  Pass False on TP ranks other than 0 so parameters
                replicated over TP (norm weights) are counted once in the reduced sums.

        Returns:
            A Python float (0.0 when ‖θ‖ = 0 and θ = φ).
        """
        self._require_initialized("gap")
        pairs = self._paired(modules)
        # On θ's device: the sums are all-reduced, and NCCL takes no host tensors.
        device = pairs[0][1].device if pairs else torch.device("cpu")
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for _, p, s in pairs:
            if not include_replicated and not getattr(p, "tensor_model_parallel", False):
                continue
            theta = p.detach().to(dtype=torch.float64)
            diff = theta - s.to(device=theta.device, dtype=torch.float64)
            sums[0] += diff.pow(2).sum()
            sums[1] += theta.pow(2).sum()
        if group is not None:
            from megatron_rlp import collectives

            collectives.all_reduce(sums, group=group)
        diff_sq, theta_sq = sums.tolist()
        if theta_sq == 0.0:
            return 0.0 if diff_sq == 0.0 else math.inf
        return math.sqrt(diff_sq / theta_sq)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        """{``"{chunk}.{parameter name}"``: fp32 tensor} (copies); empty before initialisation."""
        if self._shadow is None:
            return {}
        return {name: t.detach().clone() for name, t in self._shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], modules=None) -> None:
        """Restore φ from :meth:`state_dict`.  An empty mapping leaves the teacher uninitialised.

        With ``modules`` given the keys and shapes are checked against the model now (otherwise at
        the next update / swap) and the shadows are placed on the parameters' devices.
        """
        if not state:
            self._shadow = None
            return
        shadow = {name: t.detach().to(dtype=torch.float32).clone() for name, t in state.items()}
        if modules is not None:
            params = dict(named_parameters_of(modules))
            if params.keys() != shadow.keys():
                missing = params.keys() - shadow.keys()
                extra = shadow.keys() - params.keys()
                raise KeyError(
                    "EMA state does not match the model: "
                    f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
                )
            for name, p in params.items():
                if shadow[name].shape != p.shape:
                    raise ValueError(
                        f"EMA state {name} has shape {tuple(shadow[name].shape)}, "
                        f"parameter {tuple(p.shape)}"
                    )
                shadow[name] = shadow[name].to(device=p.device)
        self._shadow = shadow
