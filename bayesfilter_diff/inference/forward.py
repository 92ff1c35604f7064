"""The forward model of a Pyro observation site as an operator, read by replaying the model."""

from __future__ import annotations

from torch import Tensor

from ..distributions import LinearGaussian
from ..operators.base import Operator
from .handlers import unwrap
from .structure import ModelStructure

__all__ = ["PyroForward"]


class PyroForward(Operator):
    """The forward model of a Pyro observation, read by replaying the model.

    ``forward(x)`` substitutes the particles ``x`` (``(B, N, *event)``; any leading shape
    for an unbatched model) at the prior site, replays the model and returns the observed
    site's ``loc`` (Gaussian) or ``rate`` (Poisson) in the problem layout ``(B, N, *out)``.
    It is differentiable in ``x`` and nonlinear in general (``is_linear = False``).

    In ``"custom"`` mode the operator is a placeholder that carries the shapes (``out_shape``
    is the observed value's shape) and ``forward`` raises: the likelihood is only available
    through ``problem.log_likelihood``.
    """

    is_linear = False

    def __init__(
        self,
        structure: ModelStructure,
        out_shape: tuple[int, ...],
        mode: str,
        site_layout: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
    ) -> None:
        super().__init__(tuple(structure.event_shape), out_shape)
        self.structure = structure
        self.mode = mode
        self._full, self._trailing = site_layout

    def forward(self, x: Tensor) -> Tensor:
        st = self.structure
        if self.mode == "custom":
            raise ValueError(
                f"the likelihood of the Pyro site(s) {list(st.observed)} has no forward operator "
                "(it is only available as problem.log_likelihood); use a sampler that works "
                "with a general differentiable likelihood, such as TDS"
            )
        tr = st.replay(x)
        _, lead = st.to_value(x)
        fn = unwrap(tr.nodes[st.observed[0]]["fn"])
        t = (
            fn.mean
            if isinstance(fn, LinearGaussian)
            else (fn.loc if self.mode == "gaussian" else fn.rate)
        )
        t = st.from_layout(
            t, self._full, self._trailing, lead, st.obs_plates.get(st.observed[0], 0)
        )
        lead_out = t.shape[: 2 if st.batched else len(lead)]
        return t.reshape(tuple(lead_out) + tuple(self.out_shape))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, site={self.structure.observed}, " + super().extra_repr()
