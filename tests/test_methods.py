import math
import itertools

import pytest
import torch
from torch import nn

from kdarena import CompetitiveDistillation, DeepMutualLearning, Group, Independent, KnowledgeDistillation, MixedTarget
from kdarena.losses import select_teacher
from reference import ce64, kl64


def random_logits(n, batch=6, classes=5, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, classes, generator=g, dtype=dtype) * scale).requires_grad_() for _ in range(n)], torch.randint(
        0, classes, (batch,), generator=g
    )


@pytest.mark.parametrize("n,tau", list(itertools.product([2, 3, 4], [1.0, 4.0])))
def test_dml_matches_formula(n, tau):
    logits, y = random_logits(n, seed=n)
    out = DeepMutualLearning(alpha=0.7, temperature=tau).compute(logits, y)
    for i in range(n):
        expected = ce64(logits[i], y) + 0.7 / (n - 1) * sum(kl64(logits[j], logits[i], tau) for j in range(n) if j != i)
        assert out.per_network[i].item() == pytest.approx(expected, abs=1e-6)
    assert out.total.item() == pytest.approx(sum(p.item() for p in out.per_network), abs=1e-6)
    assert out.teacher is None


@pytest.mark.parametrize("n,tau", list(itertools.product([2, 3, 4], [1.0, 4.0])))
def test_cd_paper_rule_matches_formula(n, tau):
    logits, y = random_logits(n, seed=10 + n)
    ces = [ce64(z, y) for z in logits]
    teacher = min(range(n), key=lambda i: ces[i])
    out = CompetitiveDistillation(alpha=0.5, beta=0.0, temperature=tau).compute(logits, y)
    assert out.teacher == teacher
    assert torch.equal(out.per_network[teacher], torch.nn.functional.cross_entropy(logits[teacher], y))
    for i in range(n):
        expected = ces[i] + (0.0 if i == teacher else 0.5 * kl64(logits[teacher], logits[i], tau))
        assert out.per_network[i].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(out.ce, torch.tensor(ces, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("n,tau", list(itertools.product([3, 4], [1.0, 4.0])))
def test_cd_better_rule_averages_over_every_better_network(n, tau):
    logits, y = random_logits(n, seed=20 + n)
    ces = [ce64(z, y) for z in logits]
    out = CompetitiveDistillation(alpha=1.0, beta=0.0, temperature=tau, rule="better").compute(logits, y)
    assert out.teacher == min(range(n), key=lambda i: ces[i])
    for i in range(n):
        better = [j for j in range(n) if ces[j] < ces[i]]
        kd = sum(kl64(logits[j], logits[i], tau) for j in better) / len(better) if better else 0.0
        assert out.per_network[i].item() == pytest.approx(ces[i] + kd, abs=1e-6)


def test_ties_go_to_the_lowest_index_and_nonfinite_never_teaches():
    index, _ = select_teacher(torch.tensor([0.5, 0.2, 0.2, 0.9]))
    assert int(index) == 1
    index, _ = select_teacher(torch.tensor([float("nan"), 0.3, float("-inf"), float("inf")]))
    assert int(index) == 1
    index, _ = select_teacher(torch.tensor([float("nan"), float("nan")]))
    assert int(index) == -1
    z = torch.randn(4, 3)
    y = torch.randint(0, 3, (4,))
    out = CompetitiveDistillation(beta=0).compute([z.clone().requires_grad_(), z.clone().requires_grad_()], y)
    assert out.teacher == 0


def test_nan_network_never_teaches_and_its_nan_reaches_nobody():
    logits, y = random_logits(3, seed=3)
    bad = torch.full_like(logits[0], float("nan")).requires_grad_()
    group = [bad, logits[1], logits[2]]
    for method in (CompetitiveDistillation(beta=0), CompetitiveDistillation(beta=0, rule="better"), DeepMutualLearning()):
        for z in group:
            z.grad = None
        out = method.compute(group, y)
        assert out.teacher != 0
        assert torch.isnan(out.per_network[0])
        assert torch.isfinite(out.per_network[1]) and torch.isfinite(out.per_network[2])
        (out.per_network[1] + out.per_network[2]).backward()
        assert torch.isfinite(logits[1].grad).all() and torch.isfinite(logits[2].grad).all()


def _separate_grads(logits, losses):
    grads = []
    for i, loss in enumerate(losses):
        g = torch.autograd.grad(loss, logits, retain_graph=True, allow_unused=True)
        grads.append(g)
    return grads


@pytest.mark.parametrize("method", [CompetitiveDistillation(beta=0), CompetitiveDistillation(beta=0, rule="better"), DeepMutualLearning()])
def test_gradient_isolation_one_backward_equals_n_backwards(method):
    logits, y = random_logits(4, seed=7)
    out = method.compute(logits, y)
    separate = _separate_grads(logits, out.per_network)
    # each loss reaches only its own network
    for i in range(4):
        for j in range(4):
            if i != j:
                assert separate[i][j] is None or torch.count_nonzero(separate[i][j]) == 0
    total_grads = torch.autograd.grad(out.total, logits)
    for i in range(4):
        assert torch.equal(total_grads[i], separate[i][i])
    if isinstance(method, CompetitiveDistillation):
        t = out.teacher
        own_ce = torch.nn.functional.cross_entropy(logits[t], y)
        assert torch.equal(total_grads[t], torch.autograd.grad(own_ce, logits[t])[0])


def test_per_network_mixed_targets_take_part_in_selection():
    logits, y = random_logits(2, seed=5)
    perm = torch.roll(y, 1)
    mixed = MixedTarget(y, perm, 0.4)
    out = CompetitiveDistillation(beta=0).compute(logits, [y, mixed])
    assert out.ce[1].item() == pytest.approx(0.4 * ce64(logits[1], y) + 0.6 * ce64(logits[1], perm), abs=1e-6)
    assert out.ce[0].item() == pytest.approx(ce64(logits[0], y), abs=1e-6)
    with pytest.raises(ValueError, match="targets for 2 networks"):
        CompetitiveDistillation().compute(logits, [y])


def test_clean_selection_uses_the_given_ce_not_the_own_batch_ce():
    logits, y = random_logits(2, seed=9)
    own = [ce64(z, y) for z in logits]
    worse = max(range(2), key=lambda i: own[i])
    selection = torch.tensor([1.0, 1.0], dtype=torch.float64)
    selection[worse] = 0.1
    out = CompetitiveDistillation(beta=0, selection="clean").compute(logits, y, selection_ce=selection)
    assert out.teacher == worse


def test_smoothed_selection_follows_its_moving_average():
    method = CompetitiveDistillation(beta=0, selection="smoothed", smoothing=0.5)
    logits, y = random_logits(2, seed=2)
    steps = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.5]), torch.tensor([3.0, 1.5])]
    teachers = [method.compute(logits, y, selection_ce=s).teacher for s in steps]
    # EMA: [1, 2] -> [2, 1.75] -> [2.5, 1.625]; the raw CE would have flipped at step 2 already
    assert teachers == [0, 1, 1]
    assert torch.allclose(method.state_dict()["ema"].float(), torch.tensor([2.5, 1.625]))
    method = CompetitiveDistillation(beta=0, selection="smoothed", smoothing=0.9)
    method.compute(logits, y, selection_ce=torch.tensor([1.0, 2.0]))
    assert method.compute(logits, y, selection_ce=torch.tensor([3.0, 1.5])).teacher == 0  # [1.2, 1.95]


def test_feature_loss_with_adapters_between_widths():
    torch.manual_seed(0)

    class Net(nn.Module):
        feature_layer = "body"

        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU())
            self.head = nn.Linear(width, 3)

        def forward(self, x):
            return self.head(self.body(x))

    group = Group([Net(5), Net(7)], collect_features=True)
    x = torch.randn(6, 4)
    group.build_adapters(x)
    assert set(group.adapters.keys()) == {"0_to_1", "1_to_0"}
    y = torch.randint(0, 3, (6,))
    out = group(x)
    losses = CompetitiveDistillation(alpha=0.0, beta=2.0).compute(out.logits, y, features=out.features, adapt=group.adapt)
    t = out_teacher = losses.teacher
    s = 1 - t
    adapted = group.adapters[f"{s}_to_{t}"](out.features[s])
    expected = torch.nn.functional.cross_entropy(out.logits[s], y) + 2.0 * (adapted - out.features[t]).pow(2).sum() / 6
    assert losses.per_network[s].item() == pytest.approx(expected.item(), rel=1e-5)
    losses.total.backward()
    # the student's adapter learns, the teacher's network gets only its CE gradient
    assert group.adapters[f"{s}_to_{t}"].weight.grad.abs().sum() > 0
    unused = group.adapters[f"{t}_to_{s}"].weight.grad
    assert unused is None or torch.count_nonzero(unused) == 0
    assert out_teacher in (0, 1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_offline_kd_formula_and_frozen_teacher_gets_no_gradient():
    from kdarena.methods import freeze

    torch.manual_seed(0)
    teacher, student = freeze(Tiny()), Tiny()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x)
    out = KnowledgeDistillation(alpha=0.9, temperature=4.0).compute([s_logits], y, teacher_logits=t_logits)
    expected = ce64(s_logits, y) + 0.9 * kl64(t_logits, s_logits, 4.0)
    assert out.per_network[0].item() == pytest.approx(expected, abs=1e-6)
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.fc.weight.grad is not None
    with pytest.raises(ValueError, match="teacher_logits"):
        KnowledgeDistillation().compute([s_logits], y)


def test_independent_is_plain_cross_entropy():
    logits, y = random_logits(3, seed=4)
    out = Independent().compute(logits, y)
    for i in range(3):
        assert out.per_network[i].item() == pytest.approx(ce64(logits[i], y), abs=1e-6)
    assert out.teacher is None


def test_invalid_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        CompetitiveDistillation(alpha=-1)
    with pytest.raises(ValueError, match="rule"):
        CompetitiveDistillation(rule="worst")
    with pytest.raises(ValueError, match="selection"):
        CompetitiveDistillation(selection="random")
    with pytest.raises(ValueError, match="at least 2 networks"):
        CompetitiveDistillation().compute([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("n,tau", list(itertools.product([2, 3, 4], [1.0, 4.0])))
def test_cd_soft_rule_weights_every_other_network_by_the_sigmoid_of_the_ce_gap(n, tau):
    logits, y = random_logits(n, seed=40 + n)
    ces = [ce64(z, y) for z in logits]
    scale = 0.3
    out = CompetitiveDistillation(alpha=0.8, beta=0.0, temperature=tau, rule="soft", soft_scale=scale).compute(logits, y)
    assert out.teacher == min(range(n), key=lambda i: ces[i])
    for i in range(n):
        kd = sum(kl64(logits[j], logits[i], tau) / (1.0 + math.exp(-(ces[i] - ces[j]) / scale)) for j in range(n) if j != i)
        assert out.per_network[i].item() == pytest.approx(ces[i] + 0.8 * kd, abs=1e-6)


@pytest.mark.parametrize("progress,expected", [(0.0, math.exp(-5.0)), (0.15, math.exp(-5.0 * 0.25)), (0.3, 1.0), (0.9, 1.0)])
def test_cd_rampup_scales_the_distillation_term_only(progress, expected):
    from kdarena.methods import StepInput

    logits, y = random_logits(2, seed=7)
    ces = [ce64(z, y) for z in logits]
    teacher = min(range(2), key=lambda i: ces[i])
    out = CompetitiveDistillation(alpha=1.0, beta=0.0, rampup=0.3).losses(StepInput.of(logits, y, progress=progress))
    student = 1 - teacher
    assert out.per_network[teacher].item() == pytest.approx(ces[teacher], abs=1e-9)
    assert out.per_network[student].item() == pytest.approx(ces[student] + expected * kl64(logits[teacher], logits[student]), abs=1e-6)


def test_cd_soft_rule_gives_no_gradient_to_the_teachers():
    logits, y = random_logits(3, seed=5)
    out = CompetitiveDistillation(alpha=1.0, beta=0.0, rule="soft").compute(logits, y)
    out.total.backward()
    together = [z.grad.clone() for z in logits]
    for i in range(3):
        fresh = [z.detach().clone().requires_grad_() for z in logits]
        CompetitiveDistillation(alpha=1.0, beta=0.0, rule="soft").compute(fresh, y).per_network[i].backward()
        assert fresh[i].grad is not None and torch.allclose(fresh[i].grad, together[i], atol=1e-12)
        # peers are detached: nothing but zeros reaches them
        assert all(fresh[j].grad is None or not fresh[j].grad.any() for j in range(3) if j != i)
