"""Posterior sampling on Pyro models: :func:`infer` reads a model and runs a sampler.

A model has one latent site with a :class:`~bayesfilter_diff.DiffusionPrior` and one or more
observed sites (``obs=`` or ``pyro.poutine.condition``)::

    def model(y=None):
        x = pyro.sample("x", bfd.DiffusionPrior(prior))
        pyro.sample("y", bfd.LinearGaussian(A, x, noise_std=0.05), obs=y)

    post = bfd.infer(model, bfd.samplers.TDS(num_steps=100), y=y, num_samples=1000)

How the model is read
---------------------
1. The model is traced once with a placeholder (zeros of the site's shape) substituted for
   the DiffusionPrior site, so the reverse diffusion never runs. Exactly one DiffusionPrior
   site and at least one observed site are required. Other latent sites must be global
   (outside every plate), continuous or discrete with a finite support: they are sampled
   with the image by SMC^2 (:mod:`~bayesfilter_diff.inference.hierarchical`), the
   diffusion SMC estimating ``p(y | theta)`` for a batch of theta-particles at once (and
   for a plate of problems sharing them).
2. The prior site's batch shape gives the problems: ``()`` (one problem) or one non-unit
   dimension of size ``B`` (``pyro.plate`` over ``B`` independent observations), which maps
   onto the samplers' ``(B, N)`` layout.
3. The observation becomes an :class:`~bayesfilter_diff.InverseProblem`, by the first rule
   that applies:

   - ``"linear_gaussian"``: a single :class:`~bayesfilter_diff.LinearGaussian` site whose
     ``x`` is the prior site's value: ``InverseProblem(operator, y, noise_std)``; every
     sampler applies, and calling the sampler directly gives the same draws bit for bit.
   - ``"affine_gaussian"``: a single ``Normal`` (``.to_event`` allowed) or
     ``LinearGaussian`` site with a scale that does not depend on ``x`` (one per problem
     at most) and a mean that is affine in ``x``, ``M x + c``: ``M`` and ``c`` are
     materialised by replays and checked at random probes
     (:mod:`~bayesfilter_diff.inference.linearize`), giving
     ``InverseProblem(Dense(M), y - c, noise_std)`` (every linear-Gaussian sampler) or, when
     ``M`` differs between problems (an operator parameter per theta-particle), a
     :class:`~bayesfilter_diff.operators.PerProblemDense` (TDS). The model's own likelihood
     is compared with the linear one at the returned draws; ``infer(..., linearize=False)``
     skips this rule.
   - ``"gaussian"`` / ``"poisson"``: a single ``Normal`` (``.to_event`` allowed) site with a
     scale that does not depend on ``x`` (one per problem at most), a ``LinearGaussian`` of
     a function of ``x``, or a ``Poisson`` site: the forward model ``x -> loc`` (or
     ``rate``) is read by replaying the model (:class:`PyroForward`, a nonlinear
     operator), with Gaussian or Poisson noise, so gradient samplers that need a forward
     model (DPS) apply.
   - ``"custom"``: anything else (Laplace, Student-t, Bernoulli, several observed sites,
     heteroscedastic noise, ``poutine.scale`` / ``mask``): ``log_likelihood_fn`` replays
     the model with the particles substituted at the prior site and sums the observed
     sites' ``log_prob`` (scaled and masked as Pyro would) per particle. The operator is a
     placeholder (:class:`PyroForward` in ``"custom"`` mode) whose ``out_shape`` is the
     observed value's shape (the concatenated flattened values for several sites) and
     whose ``forward`` raises: a sampler that needs ``A`` cannot use such a likelihood.

Vectorisation contract (as Pyro's ``vectorize_particles``): when the likelihood is
evaluated, the prior site's value carries all particles at once, with shape
``(N, *layout, *event_shape)`` where ``layout`` is the model's batch layout (the prior
site's batch shape, padded on the left to the model's largest batch rank ``L``): ``(N, B,
*event)`` for a model with one ``pyro.plate`` of problems, ``(N, *event)`` for a model
without plates. The model must compute with ``x`` by broadcasting over these leading
dimensions (``x[..., i]``, ``x @ W.T``, operators, ...). Distribution validation is off
during the replays, so a particle outside a parameter's domain gives NaN / -inf (weight 0 in
the SMC samplers) instead of an exception.

Samplers that need a linear-Gaussian problem (an SVD, a Gaussian noise model) raise a clear
error naming the sampler and the likelihood. :class:`~bayesfilter_diff.samplers.DDIM`
ignores the observation: with it, :func:`infer` returns prior draws.
"""

from .forward import PyroForward
from .hierarchical import HierarchicalPosterior, infer_hierarchical
from .posterior import Posterior, infer
from .reading import model_to_problem
from .structure import ModelStructure

__all__ = [
    "infer",
    "infer_hierarchical",
    "Posterior",
    "HierarchicalPosterior",
    "model_to_problem",
    "PyroForward",
    "ModelStructure",
]
