"""The arena's losses (KDCL, PCL, PS-KD) against float64 references written from the papers' formulas,
gradient isolation, non-finite peers, PCL's temporal means and PS-KD's prediction store."""
import copy
import itertools

import pytest
import torch
from torch import nn

from kdarena.methods import KDCL, MethodContext, PeerCollaborativeLearning, ProgressiveSelfKD, StepInput
from kdarena.losses import sigmoid_rampup
from kdarena.methods.temporal import ema_decay_at
from reference import ce64
from reference_kdcl_pcl_pskd import kdcl64, pcl64, pskd64

GRID = list(itertools.product([2, 3, 4], [1.0, 4.0]))


def random_logits(n, batch=6, classes=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).requires_grad_() for _ in range(n)]
    return logits, torch.randint(0, classes, (batch,), generator=g)


# ---------------------------------------------------------------------------------- KDCL
@pytest.mark.parametrize("ensemble", ["naive", "minlogit"])
@pytest.mark.parametrize("n,tau", GRID)
def test_kdcl_matches_formula(n, tau, ensemble):
    logits, y = random_logits(n, seed=100 + n)
    out = KDCL(alpha=0.7, temperature=tau, ensemble=ensemble).compute(logits, y)
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(kdcl64(logits, y, i, 0.7, tau, ensemble), abs=1e-9)
    assert out.total.item() == pytest.approx(sum(p.item() for p in out.per_network), abs=1e-9)
    assert out.teacher is None
    assert torch.allclose(out.ce, torch.tensor([ce64(z, y) for z in logits], dtype=torch.float64), atol=1e-9)


def test_kdcl_minlogit_uses_the_true_class():
    # two peers that agree up to a per-sample shift of all logits: MinLogit must see no difference
    z = torch.tensor([[1.0, 3.0, -1.0], [0.5, 0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    method = KDCL(ensemble="minlogit")
    ensemble, _ = method.teacher_logits(StepInput.of([z, z + torch.tensor([[5.0], [-3.0]], dtype=torch.float64)], y, y=y))
    assert torch.allclose(ensemble, z - z.gather(1, y[:, None]))
    assert torch.all(ensemble.gather(1, y[:, None]) == 0)


def grads_of_each_loss(make_out, n):
    """Gradients of every network's logits from one backward of the total, and from each loss alone."""
    logits, y = random_logits(n, seed=7)
    make_out(logits, y).total.backward()
    together = [z.grad.clone() for z in logits]
    alone = []
    for i in range(n):
        fresh = [z.detach().clone().requires_grad_() for z in logits]
        make_out(fresh, y).per_network[i].backward()
        assert all(fresh[j].grad is None or torch.all(fresh[j].grad == 0) for j in range(n) if j != i), \
            f"loss {i} sent gradient into another network: the teacher is not detached"
        alone.append(fresh[i].grad.clone())
    return together, alone


@pytest.mark.parametrize("name", ["kdcl-naive", "kdcl-minlogit", "pskd"])
def test_the_teachers_get_no_gradient(name):
    # PS-KD is stateful (every call stores predictions): each call starts from the same stored state
    stored = ProgressiveSelfKD()
    stored.setup(MethodContext(5, 1, torch.device("cpu"), train_size=6))
    stored.compute(random_logits(3, seed=8)[0], torch.arange(6) % 5, index=torch.arange(6))

    def make(logits, y):
        if name == "pskd":
            method = ProgressiveSelfKD()
            method.setup(MethodContext(5, 1, torch.device("cpu"), train_size=6))
            method.load_state_dict(stored.state_dict())
        else:
            method = KDCL(temperature=4.0, ensemble=name.split("-")[1])
        return method.losses(StepInput.of(logits, y, y=y, index=torch.arange(6), progress=0.5))

    together, alone = grads_of_each_loss(make, 3)
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-12)
    assert stored.predictions.grad is None and not stored.predictions.requires_grad


def test_kdcl_leaves_a_nonfinite_peer_out_of_the_ensemble():
    logits, y = random_logits(3, seed=5)
    bad = torch.full_like(logits[0], float("nan")).requires_grad_()
    for ensemble in ("naive", "minlogit"):
        out = KDCL(ensemble=ensemble).compute([bad, logits[1], logits[2]], y)
        assert torch.isnan(out.per_network[0])
        for i in (1, 2):  # as if the group had been the two finite peers
            assert out.per_network[i].item() == pytest.approx(kdcl64(logits[1:], y, i - 1, 1.0, 1.0, ensemble), abs=1e-9)
        (out.per_network[1] + out.per_network[2]).backward()
        assert torch.isfinite(logits[1].grad).all() and torch.isfinite(logits[2].grad).all()
        logits[1].grad = logits[2].grad = None


def test_kdcl_asks_for_own_views_and_no_perturbation():
    assert KDCL().needs.own_views and not KDCL(own_views=False).needs.own_views
    assert not KDCL().needs.perturbation and KDCL().needs.min_networks == 2


# ---------------------------------------------------------------------------------- PCL
@pytest.mark.parametrize("n,tau", GRID)
def test_pcl_matches_formula_given_the_temporal_means(n, tau):
    logits, y = random_logits(n, seed=200 + n)
    means, _ = random_logits(n, seed=300 + n)
    method = PeerCollaborativeLearning(alpha=0.6, temperature=tau)
    out = method.losses(StepInput.of(logits, y), mean_logits=means)
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(pcl64(logits, means, y, i, 0.6, tau), abs=1e-9)
    # gradient isolation: the ensemble and the temporal means are constants for every student
    assert_isolated_given_means(method, out, logits, means, y)


def assert_isolated_given_means(method, out, logits, means, y):
    """One backward of the total gives every network the gradient of its own loss alone; the means get none."""
    out.total.backward()
    together = [z.grad.clone() for z in logits]
    assert all(m.grad is None for m in means)
    for i in range(len(logits)):
        fresh = [z.detach().clone().requires_grad_() for z in logits]
        method.losses(StepInput.of(fresh, y), mean_logits=means).per_network[i].backward()
        assert all(fresh[j].grad is None or torch.all(fresh[j].grad == 0) for j in range(len(logits)) if j != i)
        assert torch.allclose(fresh[i].grad, together[i], atol=1e-12)


def test_pcl_rampup_weights_the_peer_mean_term_only():
    logits, y = random_logits(3, seed=9)
    means, _ = random_logits(3, seed=10)
    method = PeerCollaborativeLearning(temperature=2.0, rampup_epochs=10)
    out = method.losses(StepInput.of(logits, y, epoch=3), mean_logits=means)
    w = sigmoid_rampup(3.0, 10.0)
    assert w == pytest.approx(2.718281828459045 ** (-5 * 0.7 ** 2))
    for i in range(3):
        assert out.per_network[i].item() == pytest.approx(pcl64(logits, means, y, i, 1.0, 2.0, weight=w), abs=1e-9)
    assert sigmoid_rampup(10.0, 10.0) == sigmoid_rampup(50.0, 10.0) == sigmoid_rampup(0.0, 0.0) == 1.0


def test_pcl_temporal_means_follow_the_documented_decay():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(2)]
    method = PeerCollaborativeLearning(ema_decay=0.5)
    method.setup(MethodContext(3, 1, torch.device("cpu"), nets))
    assert all(not p.requires_grad for m in method.means for p in m.parameters()) and not method.means[0].training
    start = [copy.deepcopy(m.state_dict()) for m in method.means]
    for net in nets:  # the online networks move: weights and BN statistics
        net.train()
        net(torch.randn(8, 4))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    step = 0  # decay_0 = min(0.5, 1/10) = 0.1
    assert ema_decay_at(step, 0.5) == pytest.approx(0.1) and ema_decay_at(1000, 0.5) == 0.5
    method.after_step(nets, None, StepInput.of([torch.zeros(1, 3)], torch.zeros(1, dtype=torch.long), step=step))
    for i, net in enumerate(nets):
        online, mean = net.state_dict(), method.means[i].state_dict()
        for key, value in mean.items():
            if value.dtype.is_floating_point:
                assert torch.allclose(value, 0.1 * start[i][key] + 0.9 * online[key], atol=1e-6), key
            else:
                assert torch.equal(value, online[key]), key
    assert set(method.eval_networks()) == {"mean0", "mean1"}
    # the state round-trips exactly
    other = PeerCollaborativeLearning(ema_decay=0.5)
    other.setup(MethodContext(3, 1, torch.device("cpu"), nets))
    other.load_state_dict(method.state_dict())
    for a, b in zip(method.means, other.means):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_pcl_runs_its_temporal_means_on_the_batch():
    torch.manual_seed(1)
    nets = [nn.Linear(4, 3).double() for _ in range(3)]
    method = PeerCollaborativeLearning(temperature=3.0)
    method.setup(MethodContext(3, 1, torch.device("cpu"), nets))
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    logits = [net(x) for net in nets]
    out = method.losses(StepInput.of(logits, y, x=x))
    means = [m(x).detach() for m in method.means]
    for i in range(3):
        assert out.per_network[i].item() == pytest.approx(pcl64(logits, means, y, i, 1.0, 3.0), abs=1e-6)


# ---------------------------------------------------------------------------------- PS-KD
@pytest.mark.parametrize("n", [1, 2, 3])
def test_pskd_soft_targets_match_formula(n):
    train_size, batch, classes = 10, 6, 5
    method = ProgressiveSelfKD(alpha_T=0.8, epochs=4)
    method.setup(MethodContext(classes, 1, torch.device("cpu"), train_size=train_size))
    g = torch.Generator().manual_seed(n)
    first_index, second_index = torch.tensor([0, 2, 4, 6, 8, 9]), torch.tensor([9, 1, 2, 3, 4, 5])
    first, y1 = random_logits(n, batch, classes, seed=n)
    out = method.losses(StepInput.of(first, y1, index=first_index, epoch=0))
    for i in range(n):  # epoch 0: a_0 = 0, the plain CE
        assert out.per_network[i].item() == pytest.approx(ce64(first[i], y1), abs=1e-9)
    second = [(torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2).requires_grad_() for _ in range(n)]
    y2 = torch.randint(0, classes, (batch,), generator=g)
    out = method.losses(StepInput.of(second, y2, index=second_index, epoch=3))
    a = 0.8 * 3 / 4
    for i in range(n):
        stored = {int(k): torch.softmax(first[i][b].detach(), 0) for b, k in enumerate(first_index)}
        previous = [stored.get(int(k), torch.zeros(classes)) for k in second_index]
        seen = [int(k) in stored for k in second_index]
        assert out.per_network[i].item() == pytest.approx(pskd64(second[i], y2, previous, a, seen), abs=1e-6)
    assert method.predictions.shape == (n, train_size, classes) and int(method.seen.sum()) == n * 9  # sample 7 never came


def test_pskd_alpha_schedule_and_float16_store():
    method = ProgressiveSelfKD(alpha_T=0.8)
    assert method.alpha_at(StepInput.of([torch.zeros(1, 2)], torch.zeros(1, dtype=torch.long), progress=0.25)) == pytest.approx(0.2)
    method = ProgressiveSelfKD(alpha_T=0.5, epochs=10, store_dtype="float16")
    assert method.alpha_at(StepInput.of([torch.zeros(1, 2)], torch.zeros(1, dtype=torch.long), epoch=4, progress=0.49)) == 0.2
    method.setup(MethodContext(2, 1, torch.device("cpu"), train_size=3))
    method.losses(StepInput.of([torch.randn(2, 2)], torch.tensor([0, 1]), index=torch.tensor([0, 2])))
    assert method.predictions.dtype == torch.float16 and method.seen.tolist() == [[True, False, True]]


def test_pskd_needs_indices_and_a_training_set_size():
    assert ProgressiveSelfKD().needs.sample_index and ProgressiveSelfKD().needs.min_networks == 1
    with pytest.raises(ValueError, match="train_size"):
        ProgressiveSelfKD().setup(MethodContext(2, 1, torch.device("cpu"), train_size=0))
    method = ProgressiveSelfKD()
    method.setup(MethodContext(2, 1, torch.device("cpu"), train_size=4))
    with pytest.raises(ValueError, match="sample indices"):
        method.compute([torch.randn(2, 2)], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------- reproduction configs
@pytest.mark.parametrize("name", ["kdcl", "pcl", "pskd"])
def test_the_reproduction_configs_say_what_they_claim(name):
    from pathlib import Path

    from kdarena.config import load

    path = Path(__file__).resolve().parents[1] / "configs" / "paper" / f"cifar100_resnet32x3_{name}.yaml"
    text = path.read_text()
    assert "ours" in text.lower() and "73.68" in text  # the recipe block names the target rows and marks our choices
    config = load(path)
    assert config.method.name == name and config.models == ["resnet32"] * 3 and config.data.name == "cifar100"
    assert not config.perturb.enabled
    if name == "pskd":
        assert config.method.epochs == config.optim.epochs and config.method.alpha_T == 0.8
    for method in ("independent", "dml", "kdcl", "pcl", "pskd"):  # every column of the comparison loads from it
        assert load(path, [f"method.name={method}"]).method.name == method
