import torch
from torch import nn

from kdarena.mutation import MutationTracker


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
