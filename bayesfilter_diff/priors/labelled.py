"""A family of priors indexed by a class label, for a label that is itself unknown.

``LabelledPriors([prior_0, ..., prior_{C-1}])`` holds ``C`` diffusion models of one schedule
and event shape (class-conditional priors, or competing prior models). ``family.given(c)``
is a :class:`~bayesfilter_diff.DiffusionModel` for a label ``c``: an int, or a tensor of
labels, one per problem of a batch (the theta-particles of SMC^2 when ``c`` is a Pyro
site)::

    family = bfd.priors.LabelledPriors([digit_prior, letter_prior])

    def model(y=None):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])))
        x = pyro.sample("x", bfd.DiffusionPrior(family.given(c)))
        pyro.sample("y", bfd.LinearGaussian(A, x, 0.1), obs=y)

    post = bfd.infer(model, y=y)  # SMC^2: post.theta["c"] are posterior draws of the label

The labelled model's denoiser reads the problems' axis first (``x_t`` of shape
``(P, ..., *event)``, as every sampler calls it): row ``p`` is denoised by
``prior_{c_p}``; labels repeat over a plate of problems (``P`` a multiple of the number of
labels, theta-major). Each member runs once per call on the rows with its label (a loop
over the ``C`` classes, not over problems or particles).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import DiffusionModel, broadcast_time

__all__ = ["LabelledPriors"]


class LabelledPriors(nn.Module):
    """``C`` diffusion models sharing a schedule and an event shape, indexed by a label."""

    def __init__(self, priors: Sequence[DiffusionModel]) -> None:
        super().__init__()
        priors = list(priors)
        if len(priors) < 2:
            raise ValueError(f"LabelledPriors needs at least 2 priors, got {len(priors)}")
        for i, p in enumerate(priors):
            if not isinstance(p, DiffusionModel):
                raise TypeError(f"prior {i} is a {type(p).__name__}, not a DiffusionModel")
            if tuple(p.event_shape) != tuple(priors[0].event_shape):
                raise ValueError(
                    f"prior {i} has event shape {tuple(p.event_shape)}, prior 0 "
                    f"{tuple(priors[0].event_shape)}: the family needs one event shape"
                )
            if p.schedule != priors[0].schedule and repr(p.schedule) != repr(priors[0].schedule):
                raise ValueError(
                    f"prior {i} has another schedule than prior 0 ({p.schedule!r} vs "
                    f"{priors[0].schedule!r}): the family needs one path"
                )
        self.priors = nn.ModuleList(priors)
        self.members: list[DiffusionModel] = priors

    def __len__(self) -> int:
        return len(self.priors)

    def given(self, label: int | Tensor) -> DiffusionModel:
        """The prior of class ``label`` (an int), or of each problem (a tensor of labels)."""
        if isinstance(label, bool):
            raise TypeError("label must be an int or an integer tensor, not a bool")
        if isinstance(label, int):
            if not 0 <= label < len(self):
                raise ValueError(f"label {label} is out of range for {len(self)} priors")
            return self.members[label]
        if not isinstance(label, Tensor) or label.is_floating_point() or label.is_complex():
            raise TypeError(f"label must be an int or an integer tensor, got {label!r}")
        labels = label.reshape(-1).long()
        if bool(((labels < 0) | (labels >= len(self))).any()):
            raise ValueError(f"labels must lie in [0, {len(self)}), got {labels.tolist()}")
        if labels.numel() == 1:
            return self.members[int(labels[0])]
        return _LabelledModel(self, labels)


class _Members(nn.Module):
    """Holds the family (so the model's parameters give its dtype and device); not called."""

    labels: Tensor

    def __init__(self, family: LabelledPriors, labels: Tensor) -> None:
        super().__init__()
        self.family = family
        self.register_buffer("labels", labels, persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - see denoise
        raise RuntimeError("a labelled prior denoises through _LabelledModel.denoise")


class _LabelledModel(DiffusionModel):
    """The family given one label per problem: row ``p`` of the problems' axis is denoised
    by prior ``labels[p]`` (labels repeat, theta-major, over a plate of problems)."""

    net: _Members

    def __init__(self, family: LabelledPriors, labels: Tensor) -> None:
        first = family.members[0]
        super().__init__(_Members(family, labels), first.schedule, first.event_shape)

    def denoise(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        self._check(x_t)
        labels = self.net.labels.to(x_t.device)
        k = len(self.event_shape)
        lead = x_t.shape[: x_t.dim() - k]
        n = labels.numel()
        if len(lead) == 0 or lead[0] % n:
            raise ValueError(
                f"a labelled prior with {n} labels needs x_t with the problems' axis first, a "
                f"multiple of {n} rows (labels repeat over a plate of problems); got shape "
                f"{tuple(x_t.shape)}"
            )
        rows = labels.repeat_interleave(lead[0] // n)  # (P,)
        tt = broadcast_time(t, x_t, k)
        out = torch.zeros_like(x_t)
        for c, prior in enumerate(self.net.family.members):
            sel = rows == c
            if bool(sel.any()):
                out = out.index_put((sel,), prior.denoise(x_t[sel], tt[sel]))
        return out
