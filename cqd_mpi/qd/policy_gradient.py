"""Merging coefficients learnt by policy gradient (the paper's Table 1, model 8): a Gaussian
policy over the K coefficients of the experts' task vectors, trained with REINFORCE.

A population of `population` candidates c ~ N(mu, diag(sigma^2)) is drawn at once (so eval
groups score them in parallel); a candidate is the model theta_base + sum_k c_k tau_k with c
clipped into [lower, upper]^K (a /models row of kind "combination", like CMA-ES's). When the
last one is told, each candidate's reward is its raw mean search score R_j, its advantage
A_j = R_j - b with b a moving average of the populations' mean rewards (b starts at the first
population's mean, then b <- decay * b + (1 - decay) * mean_j R_j after each update), and Adam
(torch.optim.Adam) takes one step on (mu, log sigma) against the loss
-mean_j A_j log N(x_j; mu, sigma), x_j the unclipped draw. mu starts at the naive average
c = 1/K (clipped into the box), sigma at `sigma0`. The budget, the final model (the candidate
with the best mean search score) and the archives the candidates are offered to are the
coefficient searches' (qd/coefficients.py).

Resume: as for CMA-ES, no policy state is stored. The draws of population i come from
seeding keyed by (seed, i, purpose), so the policy is rebuilt by replaying the stored
candidates and scores (checked bit for bit against the draws), a few milliseconds of float64
arithmetic per population.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cqd_mpi import seeding
from cqd_mpi.qd.coefficients import CoefficientSearch, CoefficientSettings


@dataclasses.dataclass(frozen=True)
class PolicyGradientSettings(CoefficientSettings):
    """`population`, `sigma0` (the policy's initial standard deviation) and the box come from
    `qd.coefficients`; the learning rate and the baseline's decay from `qd.policy_gradient`
    (state.h5 root attributes under these names)."""

    learning_rate: float = 0.05
    baseline_decay: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma0 > 0:
            raise ValueError(f"sigma0 must be > 0, got {self.sigma0}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")


class PolicyGradient(CoefficientSearch):
    """REINFORCE with a moving-average baseline and Adam over a Gaussian policy on c."""

    method = "policy-gradient"
    label = "Policy gradient"
    final_label = "Policy gradient best"
    min_tasks = 1
    Settings = PolicyGradientSettings

    @classmethod
    def settings_from(cls, qd) -> PolicyGradientSettings:
        c, pg = qd.coefficients, qd.policy_gradient
        return PolicyGradientSettings(population=c.population, sigma0=c.sigma0, coefficient_lower=c.lower,
                                      coefficient_upper=c.upper, learning_rate=pg.learning_rate,
                                      baseline_decay=pg.baseline_decay)

    def _new_optimizer(self):
        import torch

        x0 = np.clip(np.full(self.k, 1.0 / self.k), self.lower, self.upper)
        self.mean = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        self.log_std = torch.full((self.k,), math.log(self.sigma0), dtype=torch.float64, requires_grad=True)
        self.baseline: float | None = None
        self._draws = None
        return torch.optim.Adam([self.mean, self.log_std], lr=self.settings.learning_rate)

    def policy(self) -> tuple[np.ndarray, np.ndarray]:
        """The policy's mean and standard deviation now."""
        return self.mean.detach().numpy().copy(), np.exp(self.log_std.detach().numpy())

    def _ask(self, i: int) -> np.ndarray:
        mean, std = self.policy()
        noise = seeding.numpy_rng(self.seed, i, "policy-gradient:ask").standard_normal((self.population, self.k))
        self._draws = mean + std * noise
        return np.clip(self._draws, self.lower, self.upper)

    def _tell(self, i: int, x: np.ndarray, scores: np.ndarray) -> None:
        import torch

        rewards = np.asarray(scores, dtype=np.float64).mean(axis=1)
        if self.baseline is None:
            self.baseline = float(rewards.mean())
        advantages = torch.tensor(rewards - self.baseline, dtype=torch.float64)
        draws = torch.tensor(self._draws, dtype=torch.float64)
        z = (draws - self.mean) / torch.exp(self.log_std)
        log_prob = (-0.5 * z ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(dim=1)
        loss = -(advantages * log_prob).mean()
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        decay = self.settings.baseline_decay
        self.baseline = decay * self.baseline + (1 - decay) * float(rewards.mean())
