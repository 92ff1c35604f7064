import torch, warnings, math, sys
import bayesfilter_diff as bfd
from bayesfilter_diff.samplers.registry import build
from bayesfilter_diff.studies.noise_levels import noise_problem
warnings.simplefilter("ignore")
m = sys.argv[1]; R = 12
gmm, problem = noise_problem(8, 1e-3, 0)
post = gmm.posterior(problem); C = post.covariance().double(); mu = post.mean().double()
ev, Q = torch.linalg.eigh(C)
# R replicate problems in one batch
y = problem.y.expand(R, -1).contiguous()
P = bfd.InverseProblem(problem.operator, y, noise_std=1e-3)
res = build(m, 100).sample(gmm.diffusion(bfd.VPSchedule.linear()), P, 4096, generator=torch.Generator().manual_seed(5))
W = res.weights().double(); x = res.samples.double()
mean = (W[...,None]*x).sum(1)   # (R, d)
z = ((mean-mu) @ Q) / ev.sqrt()   # (R, d) in sd units
zm = z.mean(0); zse = z.std(0)/math.sqrt(R)
print(m, "bias (sd units):", [round(float(v),3) for v in zm])
print(m, "  se          :", [round(float(v),3) for v in zse])
print(m, "between-run sd of the mean (sd units):", [round(float(v),3) for v in z.std(0)], " iid N=4096 would give", round(1/math.sqrt(4096),3), "-> N_eff ~", [int(1/float(v)**2) for v in z.std(0)])
