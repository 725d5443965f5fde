"""Float64 reference formulas of the arena's second round (MCL, OKDDip, BYOT), written from the papers'
equations with explicit loops over samples, independent of kdarena's code. They are torch float64
expressions so that autograd gives the reference gradients too."""
import torch


def log_softmax_row(row, tau=1.0):
    top = max(float(v.detach()) for v in row)  # a constant shift: no gradient needed
    shifted = [(v - top) / tau for v in row]
    log_norm = torch.log(sum(torch.exp(s) for s in shifted))
    return [s - log_norm for s in shifted]


def kl_rows(teacher, student, tau, detach_teacher=True):
    """tau^2 * (1/B) sum_b KL(softmax(teacher_b/tau) || softmax(student_b/tau)) for (B, K) tensors."""
    total = 0.0
    for b in range(student.shape[0]):
        t_row = teacher[b].detach() if detach_teacher else teacher[b]
        log_t = log_softmax_row(t_row, tau)
        log_s = log_softmax_row(student[b], tau)
        total = total + sum(torch.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
    return total / student.shape[0] * tau * tau


def ce(z, y):
    return sum(-log_softmax_row(z[b])[int(y[b])] for b in range(z.shape[0])) / z.shape[0]


# ------------------------------------------------------------------------------------------ MCL
def contrastive(v_a, v_b, y, same_sample):
    """Supervised contrastive loss of anchors v_a against the embeddings v_b:
    mean over anchors b with a positive of -1/|P(b)| sum_{p in P(b)} log(exp(s_bp) / sum_{k in D(b)} exp(s_bk)),
    s = v_a v_b^T / tau (the caller divides). ``same_sample``: the sample itself is a positive and in D(b)
    (MCL's inter-network loss as the paper writes it); else it is in neither (the same network's loss, and
    the reference code's inter-network loss)."""
    batch = v_a.shape[0]
    losses = []
    for b in range(batch):
        keep = [k for k in range(batch) if same_sample or k != b]
        positives = [p for p in keep if int(y[p]) == int(y[b])]
        if not positives:
            continue
        s = [torch.dot(v_a[b], v_b[k]) for k in range(batch)]
        log_norm = torch.log(sum(torch.exp(s[k]) for k in keep))
        losses.append(-sum(s[p] - log_norm for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else torch.zeros((), dtype=v_a.dtype)


def mcl64(logits, embeddings, y, i, alpha, gamma, beta, lam, tau, temperature, icl="paper"):
    """Network i's MCL loss: CE_i + alpha VCL_i + gamma sum_j soft-VCL(i <- j) + beta sum_j ICL(i -> j)
    + lam sum_j soft-ICL(i <- j), j over the other networks. Similarities S_ab = v_a v_b^T / tau;
    the soft terms are KL at ``temperature`` between rows of similarity matrices, the teacher's detached."""
    n = len(logits)
    v = [e / tau for e in embeddings]  # (v_a / tau) . v_b = S_ab

    def sim(a, b):
        return torch.stack([torch.stack([torch.dot(embeddings[a][r], embeddings[b][c]) / tau
                                         for c in range(len(y))]) for r in range(len(y))])
    loss = ce(logits[i], y) + alpha * contrastive(v[i], embeddings[i], y, same_sample=False)
    for j in range(n):
        if j == i:
            continue
        loss = loss + gamma * kl_rows(sim(j, j), sim(i, i), temperature)
        loss = loss + beta * contrastive(v[i], embeddings[j], y, same_sample=(icl == "paper"))
        loss = loss + lam * kl_rows(sim(j, i), sim(i, j), temperature)
    return loss


# --------------------------------------------------------------------------------------- OKDDip
def okddip64(logits, queries, keys, y, alpha, temperature, weight, detach_peers):
    """Per-network OKDDip losses; networks 0..n-2 are peers, n-1 the group leader.
    Peer a: CE_a + alpha w T^2 KL(softmax(t_a/T) || softmax(z_a/T)), t_a = sum_b A_ab z_b,
    A_ab = exp(q_a . k_b) / sum_c exp(q_a . k_c) over the peers (a itself included), per sample.
    Leader: CE_L + alpha w T^2 KL(softmax(mean_b z_b / T) || softmax(z_L/T)).
    The targets keep their gradient (the reference code); ``detach_peers`` cuts it at the peers' logits
    (the attention still learns)."""
    m = len(logits) - 1
    peers = [z.detach() if detach_peers else z for z in logits[:m]]
    batch = logits[0].shape[0]
    out = []
    for a in range(m):
        rows = []
        for b in range(batch):
            energy = [torch.dot(queries[a][b], keys[c][b]) for c in range(m)]
            top = max(float(e.detach()) for e in energy)  # a constant shift
            weights = [torch.exp(e - top) for e in energy]
            total = sum(weights)
            rows.append(sum(w / total * peers[c][b] for c, w in enumerate(weights)))
        target = torch.stack(rows)
        out.append(ce(logits[a], y) + alpha * weight * kl_rows(target, logits[a], temperature, detach_teacher=False))
    mean = sum(peers) / m
    out.append(ce(logits[m], y) + alpha * weight * kl_rows(mean, logits[m], temperature, detach_teacher=False))
    return out


# ----------------------------------------------------------------------------------------- BYOT
def byot64(z, exit_logits, exit_features, features, y, alpha, temperature, beta, reduction="sum"):
    """One network's BYOT loss: (1 - alpha) [CE(z) + sum_e CE(z_e)] + alpha T^2 sum_e KL(softmax(z/T) || softmax(z_e/T))
    + beta sum_e ||F_e - F||^2, the deepest classifier's outputs (z, F) detached in the last two terms;
    the squared distance summed over the batch and the feature (``sum``, the reference code) or divided
    by the batch size (``batchmean``)."""
    loss = (1 - alpha) * (ce(z, y) + sum(ce(ze, y) for ze in exit_logits))
    for ze, fe in zip(exit_logits, exit_features):
        loss = loss + alpha * kl_rows(z, ze, temperature)
        distance = sum(((fe[b] - features[b].detach()) ** 2).sum() for b in range(fe.shape[0]))
        loss = loss + beta * (distance if reduction == "sum" else distance / fe.shape[0])
    return loss
