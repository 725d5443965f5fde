"""The arena's second round (MCL, OKDDip, BYOT): losses and gradients against float64 references written
from the papers' equations, which network each term trains, non-finite peers, and the heads they need."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdarena.methods import StepInput
from kdarena.methods.byot import BeYourOwnTeacher
from kdarena.methods.mcl import MutualContrastiveLearning, contrastive
from kdarena.methods.okddip import OnlineDistillationDiversePeers
from reference_mcl_okddip_byot import byot64, mcl64, okddip64

B, C, D = 6, 4, 5
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])  # class 2 and 3 once: anchors without a positive in VCL


def leaves(n, *shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_() for _ in range(n)]


def unit(tensors):
    return [t / t.norm(dim=1, keepdim=True) for t in tensors]


def fresh(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(tensors):
    return [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]


# ------------------------------------------------------------------------------------------- MCL
MCL = dict(alpha=0.3, gamma=0.7, beta=0.4, lam=0.9, tau=0.5, temperature=2.0)


@pytest.mark.parametrize("n,icl", list(itertools.product([2, 3], ["paper", "code"])))
def test_mcl_matches_the_formula_in_value_and_gradient(n, icl):
    logits, raw = leaves(n, B, C, seed=n, scale=2.0), leaves(n, B, D, seed=10 + n)
    method = MutualContrastiveLearning(**MCL, icl=icl)
    out = method.compute(logits, LABELS, y=LABELS, extras={"heads": [{"embedding": e} for e in unit(raw)]})
    out.total.backward()
    ours = grads(logits) + grads(raw)
    ref_logits, ref_raw = fresh(logits), fresh(raw)
    embeddings = unit(ref_raw)
    references = [mcl64(ref_logits, embeddings, LABELS, i, **MCL, icl=icl) for i in range(n)]
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(references[i].item(), abs=1e-10)
    sum(references).backward()
    for a, b in zip(ours, grads(ref_logits) + grads(ref_raw)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_mcl_variants_differ_only_in_the_same_image_across_networks():
    logits, raw = leaves(2, B, C, seed=1), leaves(2, B, D, seed=2)
    heads = {"heads": [{"embedding": e} for e in unit(raw)]}
    paper, code = (MutualContrastiveLearning(icl=v).compute(logits, LABELS, y=LABELS, extras=heads) for v in ("paper", "code"))
    assert paper.terms["vcl_0"] == code.terms["vcl_0"] and paper.terms["soft_icl_0"] == code.terms["soft_icl_0"]
    assert paper.terms["icl_0"] != code.terms["icl_0"]


def test_contrastive_leaves_out_anchors_without_a_positive():
    sim = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, -1.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    same = y[:, None] == y[None, :]
    eye = torch.eye(3, dtype=torch.bool)
    # anchors 0 and 1 are each other's only positive; anchor 2 has none and is left out of the mean
    expected = -((2.0 - math.log(math.exp(2.0) + math.exp(1.0))) + (2.0 - math.log(math.exp(2.0) + math.exp(-1.0)))) / 2
    assert contrastive(sim, same & ~eye, ~eye).item() == pytest.approx(expected, abs=1e-12)
    assert contrastive(sim, torch.zeros_like(eye), ~eye).item() == 0.0


def test_mcl_soft_terms_send_no_gradient_into_the_teacher_rows():
    # gamma only: soft VCL's teacher S_jj is detached, so network i's loss moves only network i's embedding
    logits, raw = leaves(2, B, C, seed=3), leaves(2, B, D, seed=4)
    method = MutualContrastiveLearning(alpha=0.0, gamma=1.0, beta=0.0, lam=0.0)
    out = method.compute(logits, LABELS, y=LABELS, extras={"heads": [{"embedding": e} for e in unit(raw)]})
    (out.per_network[0] - out.ce[0]).backward()
    assert raw[0].grad.abs().sum() > 0 and raw[1].grad is None or torch.all(raw[1].grad == 0)


def test_mcl_leaves_a_diverged_network_out_of_its_peers_terms():
    logits, raw = leaves(3, B, C, seed=5), leaves(3, B, D, seed=6)
    embeddings = unit(raw)
    embeddings[2] = embeddings[2] * float("nan")
    out = MutualContrastiveLearning().compute(logits, LABELS, y=LABELS, extras={"heads": [{"embedding": e} for e in embeddings]})
    (out.per_network[0] + out.per_network[1]).backward()
    assert all(torch.isfinite(out.per_network[i]) for i in (0, 1))
    assert all(torch.isfinite(t.grad).all() for t in (raw[0], raw[1], logits[0], logits[1]))
    healthy = MutualContrastiveLearning().compute(fresh(logits[:2]), LABELS, y=LABELS,
                                                  extras={"heads": [{"embedding": e} for e in unit(fresh(raw[:2]))]})
    assert out.terms["vcl_0"] == healthy.terms["vcl_0"] and out.terms["icl_1"] == healthy.terms["icl_1"]


# ---------------------------------------------------------------------------------------- OKDDip
@pytest.mark.parametrize("n,detach", list(itertools.product([3, 4], [False, True])))
def test_okddip_matches_the_formula_in_value_and_gradient(n, detach):
    m = n - 1
    logits, queries, keys = leaves(n, B, C, seed=n, scale=2.0), leaves(m, B, 3, seed=20 + n), leaves(m, B, 3, seed=30 + n)
    heads = [{"attention": (q, k)} for q, k in zip(queries, keys)] + [{"attention": (queries[0] * 0, keys[0] * 0)}]
    method = OnlineDistillationDiversePeers(alpha=0.8, temperature=2.0, rampup=0.5, detach_peers=detach)
    out = method.compute(logits, LABELS, extras={"heads": heads}, progress=0.25)
    weight = math.exp(-5.0 * 0.5 ** 2)  # exp(-5 (1 - t/ramp)^2) at t = 0.25, ramp 0.5
    assert out.terms["kd_weight"].item() == pytest.approx(0.8 * weight)
    out.total.backward()
    ours = grads(logits) + grads(queries) + grads(keys)
    ref = [fresh(logits), fresh(queries), fresh(keys)]
    references = okddip64(*ref, LABELS, 0.8, 2.0, weight, detach)
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(references[i].item(), abs=1e-10)
    sum(references).backward()
    for a, b in zip(ours, grads(ref[0]) + grads(ref[1]) + grads(ref[2])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_okddip_detached_peers_learn_only_from_their_own_loss_but_the_attention_learns():
    logits, queries, keys = leaves(3, B, C, seed=7), leaves(2, B, 3, seed=8), leaves(2, B, 3, seed=9)
    heads = [{"attention": (q, k)} for q, k in zip(queries, keys)] + [{}]
    out = OnlineDistillationDiversePeers(detach_peers=True, rampup=0.0).compute(logits, LABELS, extras={"heads": heads})
    out.per_network[2].backward()  # the leader's loss
    assert all(t.grad is None or torch.all(t.grad == 0) for t in logits[:2]) and logits[2].grad.abs().sum() > 0
    out = OnlineDistillationDiversePeers(detach_peers=True, rampup=0.0).compute(fresh(logits), LABELS, extras={"heads": heads})
    out.per_network[0].backward()
    assert queries[0].grad.abs().sum() > 0 and keys[1].grad.abs().sum() > 0


def test_okddip_leaves_a_diverged_peer_out_of_every_target():
    logits, queries, keys = leaves(4, B, C, seed=11), leaves(3, B, 3, seed=12), leaves(3, B, 3, seed=13)
    logits[1] = (logits[1].detach() * float("nan")).requires_grad_()
    heads = [{"attention": (q, k)} for q, k in zip(queries, keys)] + [{}]
    out = OnlineDistillationDiversePeers().compute(logits, LABELS, extras={"heads": heads})
    healthy = [0, 2, 3]
    sum(out.per_network[i] for i in healthy).backward()
    assert all(torch.isfinite(out.per_network[i]) for i in healthy)
    assert all(torch.isfinite(t.grad).all() for t in [logits[0], logits[2], logits[3], *queries, *keys] if t.grad is not None)


# ------------------------------------------------------------------------------------------ BYOT
@pytest.mark.parametrize("reduction,n", [("sum", 1), ("batchmean", 2)])
def test_byot_matches_the_formula_in_value_and_gradient(reduction, n):
    logits, features = leaves(n, B, C, seed=40 + n, scale=2.0), leaves(n, B, D, seed=50 + n)
    exit_logits = [leaves(2, B, C, seed=60 + i, scale=2.0) for i in range(n)]
    exit_features = [leaves(2, B, D, seed=70 + i) for i in range(n)]
    heads = [{"exits": (exit_logits[i], exit_features[i], features[i])} for i in range(n)]
    method = BeYourOwnTeacher(alpha=0.3, temperature=2.5, beta=0.05, feature_reduction=reduction)
    out = method.compute(logits, LABELS, extras={"heads": heads})
    out.total.backward()
    flat = lambda groups: [t for group in groups for t in group]  # noqa: E731
    mine = [logits, features, flat(exit_logits), flat(exit_features)]
    ours = [g for group in mine for g in grads(group)]
    ref = [fresh(group) for group in mine]
    references = [byot64(ref[0][i], ref[2][2 * i:2 * i + 2], ref[3][2 * i:2 * i + 2], ref[1][i], LABELS, 0.3, 2.5, 0.05,
                         reduction) for i in range(n)]
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(references[i].item(), abs=1e-10)
    sum(references).backward()
    for a, b in zip(ours, [g for group in ref for g in grads(group)]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # the deepest classifier's feature is the hints' teacher: no term moves it
    assert features[0].grad is None or torch.all(features[0].grad == 0)


def test_byot_deepest_classifier_gets_only_its_own_ce():
    z = leaves(1, B, C, seed=80, scale=2.0)[0]
    exits = leaves(2, B, C, seed=81, scale=2.0)
    method = BeYourOwnTeacher(alpha=0.4)
    out = method.compute([z], LABELS, extras={"heads": [{"exits": (exits, leaves(2, B, D, seed=82), leaves(1, B, D, seed=83)[0])}]})
    out.total.backward()
    alone = z.detach().clone().requires_grad_()
    (0.6 * torch.nn.functional.cross_entropy(alone, LABELS)).backward()
    torch.testing.assert_close(z.grad, alone.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method,key", [(MutualContrastiveLearning, "embedding"), (OnlineDistillationDiversePeers, "attention"),
                                        (BeYourOwnTeacher, "exits")])
def test_a_step_without_the_heads_is_refused(method, key):
    logits = leaves(3, B, C, seed=90)
    with pytest.raises(ValueError, match=key):
        method().losses(StepInput.of(logits, LABELS, y=LABELS))
