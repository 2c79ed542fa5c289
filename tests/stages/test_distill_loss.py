"""On-policy distillation loss against hand-worked values and the exact reverse-KL gradient."""
from __future__ import annotations

import torch

from stages.distill_loss import reverse_kl_loss


def close(a: torch.Tensor, b, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def test_reverse_kl_loss_hand_worked() -> None:
    # student log-probs -1, -2 (a third token masked), teacher -1.5, -1: k = .5, -1
    # loss = (.5 · -1 + -1 · -2) / 2 tokens = (-.5 + 2) / 2 = .75; reverse_kl = (.5 - 1) / 2 = -.25
    # gradient k / N = .25, -.5 (and 0 on the masked token): the student is pushed down where it
    # is more confident than the teacher and up where it is less
    s = torch.tensor([[-1.0, -2.0, -7.0]], requires_grad=True)
    t = torch.tensor([[-1.5, -1.0, -0.1]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = reverse_kl_loss(s, t, mask, num_tokens=2)
    close(loss, 0.75)
    close(m["reverse_kl"], -0.25)
    loss.backward()
    close(s.grad, [[0.25, -0.5, 0.0]])


def test_expected_gradient_is_the_exact_reverse_kl_gradient() -> None:
    # one position, vocabulary of 5: averaging the loss's gradient over every token v weighted by
    # π_s(v) (the expectation over the student's samples) equals ∇_logits KL(π_s ‖ π_t)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(logits, dim=0)  # [5]
    kl = (logp.exp() * (logp - teacher)).sum()
    (exact,) = torch.autograd.grad(kl, logits)
    expected = torch.zeros(5, dtype=torch.float64)
    for v in range(5):
        lp = torch.log_softmax(logits, dim=0)
        loss, _ = reverse_kl_loss(lp[v].view(1, 1), teacher[v].view(1, 1), torch.ones(1, 1), 1)
        (grad,) = torch.autograd.grad(loss, logits)
        expected += lp[v].exp().detach() * grad
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=0)


def test_student_equal_to_teacher_has_zero_loss_and_gradient() -> None:
    s = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    loss, m = reverse_kl_loss(s, s.detach(), torch.ones(1, 2), 2)
    loss.backward()
    assert loss.item() == 0.0 and m["reverse_kl"].item() == 0.0 and torch.equal(s.grad, torch.zeros(1, 2))


def test_minimising_the_loss_on_own_samples_learns_the_teacher() -> None:
    # a categorical student (20 logits) sampling 64 tokens a step from itself: the exact reverse KL
    # to a sharp teacher falls (observed 2.9 -> 0.03 over 60 Adam steps at lr .1)
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(20, generator=g) * 3, dim=0)
    theta = torch.zeros(20, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)

    def exact_kl() -> float:
        lp = torch.log_softmax(theta.detach(), dim=0)
        return float((lp.exp() * (lp - teacher)).sum())

    start = exact_kl()
    for _ in range(60):
        lp = torch.log_softmax(theta, dim=0)
        o = torch.multinomial(lp.detach().exp(), 64, replacement=True, generator=g)
        loss, _ = reverse_kl_loss(lp[o].view(1, -1), teacher[o].view(1, -1), torch.ones(1, 64), 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 2.0 and exact_kl() < 0.1 * start, (start, exact_kl())
