import copy

import pytest
import torch
from torch import nn

from kdarena.perturb import MutationTracker, ParameterMutation

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def gen(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_networks(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)])


def snapshot(networks):
    return [{k: v.clone() for k, v in net.state_dict().items()} for net in networks]


def test_mutation_changes_only_the_chosen_network_and_is_reproducible():
    networks = make_networks()
    before = snapshot(networks)
    tracker = MutationTracker(3, scale=0.05, every=1, rollback_after=0, seed=3)
    chosen = tracker.before_step(0, networks)
    after = snapshot(networks)
    for i in range(3):
        same = all(torch.equal(before[i][k], after[i][k]) for k in before[i])
        assert same == (i != chosen)
    # relative size of the noise follows the scale, tensor by tensor
    for k in before[chosen]:
        rel = (after[chosen][k] - before[chosen][k]).norm() / before[chosen][k].norm()
        assert 0.01 < rel < 0.15
    other = make_networks()
    again = MutationTracker(3, scale=0.05, every=1, rollback_after=0, seed=3)
    assert again.before_step(0, other) == chosen
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), networks.state_dict().values()))


def test_mutation_that_never_wins_is_rolled_back_and_a_winner_stays():
    networks = make_networks()
    before = snapshot(networks)
    tracker = MutationTracker(3, scale=0.1, every=100, rollback_after=2, seed=1)
    chosen = tracker.before_step(0, networks)
    loser_teacher = (chosen + 1) % 3
    tracker.after_step(loser_teacher, networks)
    assert not all(torch.equal(before[chosen][k], v) for k, v in networks[chosen].state_dict().items())
    tracker.after_step(loser_teacher, networks)
    assert all(torch.equal(before[chosen][k], v) for k, v in networks[chosen].state_dict().items())
    assert tracker.pop_counts() == {"mutations": 1, "mutations_won": 0, "mutations_rolled_back": 1}

    chosen = tracker.before_step(100, networks)
    mutated = snapshot(networks)[chosen]
    tracker.after_step(chosen, networks)  # it became the teacher: the mutation won and stays
    tracker.after_step((chosen + 1) % 3, networks)
    tracker.after_step((chosen + 1) % 3, networks)
    assert all(torch.equal(mutated[k], v) for k, v in networks[chosen].state_dict().items())
    assert tracker.pop_counts() == {"mutations": 1, "mutations_won": 1, "mutations_rolled_back": 0}


def test_mutation_state_round_trip_continues_the_same_sequence():
    networks = make_networks()
    tracker = MutationTracker(3, scale=0.05, every=1, rollback_after=0, seed=5)
    tracker.before_step(0, networks)
    state = tracker.state_dict()
    copy_nets = make_networks(1)
    copy_nets.load_state_dict(networks.state_dict())
    resumed = MutationTracker(3, scale=0.05, every=1, rollback_after=0, seed=99)
    resumed.load_state_dict(state)
    assert tracker.before_step(1, networks) == resumed.before_step(1, copy_nets)
    assert all(torch.equal(a, b) for a, b in zip(networks.state_dict().values(), copy_nets.state_dict().values()))


def test_without_rollback_a_mutation_is_judged_on_its_first_step_only():
    networks = make_networks()
    tracker = MutationTracker(3, scale=0.1, every=100, rollback_after=0, seed=2)
    chosen = tracker.before_step(0, networks)
    tracker.after_step((chosen + 1) % 3, networks)  # lost its first step
    tracker.after_step(chosen, networks)  # a later win does not count for it
    assert tracker.pop_counts() == {"mutations": 1, "mutations_won": 0, "mutations_rolled_back": 0}


# ---------------------------------------------------------------------------------------
# Parameter mutation
# ---------------------------------------------------------------------------------------
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 10))
    return m


def test_parameter_mutation_changes_only_module_and_scales_noise():
    m, other = make_model(), make_model()
    before = copy.deepcopy(m.state_dict())
    backup = ParameterMutation(scale=0.05, seed=0).mutate(m)
    assert set(backup) == {n for n, _ in m.named_parameters()}
    for (n, p0), (_, p1) in zip(other.named_parameters(), m.named_parameters()):
        assert torch.equal(p0, before[n])  # the other module is untouched
        assert torch.equal(backup[n], before[n])  # backup is the original
        if p0.norm() == 0:
            assert torch.equal(p1, p0)
            continue
        ratio = ((p1 - p0).norm() / p0.norm()).item()
        tol = 0.1 if p0.numel() >= 1000 else 0.35
        assert abs(ratio / 0.05 - 1) < tol, (n, ratio)
    # buffers untouched
    assert torch.equal(m[2].running_mean, before["2.running_mean"])
    assert m[2].num_batches_tracked == before["2.num_batches_tracked"]


def test_parameter_mutation_reproducible_and_restore():
    a, b, c = make_model(), make_model(), make_model()
    ParameterMutation(0.01, seed=3).mutate(a)
    ParameterMutation(0.01, seed=3).mutate(b)
    ParameterMutation(0.01, seed=4).mutate(c)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if pa.norm() > 0:  # a zero tensor (BatchNorm bias) has zero noise by construction
            assert not torch.equal(pa, pc)
    m = make_model()
    orig = copy.deepcopy(m.state_dict())
    mut = ParameterMutation(0.1, seed=0)
    backup = mut.mutate(m)
    assert not torch.equal(m[0].weight, orig["0.weight"])
    mut.restore(m, backup)
    for k, v in m.state_dict().items():
        assert torch.equal(v, orig[k])
    # explicit generator
    g1, g2 = gen(8), gen(8)
    x, y = make_model(), make_model()
    mut.mutate(x, g1)
    mut.mutate(y, g2)
    assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))


def test_parameter_mutation_state_dict_and_dtypes():
    mut = ParameterMutation(0.02, seed=1)
    mut.mutate(make_model())
    state = copy.deepcopy(mut.state_dict())
    a, b = make_model(), make_model()
    mut.mutate(a)
    other = ParameterMutation(0.02, seed=99)
    other.load_state_dict(state)
    other.mutate(b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    half = make_model().to(torch.bfloat16)
    ref = [p.clone() for p in half.parameters()]
    mut.mutate(half)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert any(not torch.equal(p, r) for p, r in zip(half.parameters(), ref))
    with pytest.raises(ValueError, match="scale"):
        ParameterMutation(scale=-1.0)


def test_parameter_mutation_does_not_touch_autograd():
    m = make_model()
    ParameterMutation(0.01).mutate(m)
    assert all(p.grad is None and p.requires_grad for p in m.parameters())



@CUDA
def test_cuda_parameter_mutation_matches_cpu():
    cpu_m, gpu_m = make_model(), make_model().cuda()
    ParameterMutation(0.05, seed=1).mutate(cpu_m)
    ParameterMutation(0.05, seed=1).mutate(gpu_m)
    for p, q in zip(cpu_m.parameters(), gpu_m.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)
