"""Float64 reference formulas of the arena's methods (KDCL, PCL, PS-KD), written from the papers'
formulas with Python loops, independent of kdarena's code."""
import math

from reference import ce64, softmax64


def _rows(z):
    return [[float(v) for v in row] for row in z.detach().double()]


def kl_probs64(pt, student, tau=1.0):
    """KL(pt || softmax(student/tau)) * tau^2 averaged over the batch; pt: list of rows of probabilities."""
    ps = softmax64(student, tau)
    total = 0.0
    for b, row in enumerate(pt):
        for k, p in enumerate(row):
            if p > 0:
                total += p * (math.log(p) - math.log(float(ps[b, k])))
    return total / len(pt) * tau * tau


def softmax_rows(rows, tau=1.0):
    out = []
    for row in rows:
        top = max(row)
        e = [math.exp((v - top) / tau) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def naive_ensemble64(logits):
    """KDCL naive: z_ens[b][k] = mean over peers of z_j[b][k]."""
    peers = [_rows(z) for z in logits]
    return [[sum(p[b][k] for p in peers) / len(peers) for k in range(len(peers[0][0]))] for b in range(len(peers[0]))]


def minlogit_ensemble64(logits, y):
    """KDCL MinLogit: z_ens[b][k] = min over peers of (z_j[b][k] - z_j[b][y_b])."""
    peers = [_rows(z) for z in logits]
    return [[min(p[b][k] - p[b][int(y[b])] for p in peers) for k in range(len(peers[0][0]))] for b in range(len(peers[0]))]


def kdcl64(logits, y, i, alpha, tau, ensemble):
    """L_i = CE_i + alpha * tau^2 * KL(softmax(z_ens/tau) || softmax(z_i/tau))."""
    z_ens = naive_ensemble64(logits) if ensemble == "naive" else minlogit_ensemble64(logits, y)
    return ce64(logits[i], y) + alpha * kl_probs64(softmax_rows(z_ens, tau), logits[i], tau)


def pcl64(logits, mean_logits, y, i, alpha, tau, weight=1.0):
    """L_i = CE_i + alpha * tau^2 * [w * KL(p_pmt_i || p_i) + KL(p_ens || p_i)],
    p_pmt_i = mean over j != i of softmax(m_j/tau), p_ens = softmax(mean_j z_j / tau)."""
    n = len(logits)
    others = [softmax_rows(_rows(mean_logits[j]), tau) for j in range(n) if j != i]
    p_pmt = [[sum(o[b][k] for o in others) / len(others) for k in range(len(others[0][0]))] for b in range(len(others[0]))]
    p_ens = softmax_rows(naive_ensemble64(logits), tau)
    return ce64(logits[i], y) + alpha * (weight * kl_probs64(p_pmt, logits[i], tau) + kl_probs64(p_ens, logits[i], tau))


def pskd64(z, y, previous, a, seen):
    """-(1/B) sum_b sum_k t_bk log p_bk, t_b = (1 - a) onehot(y_b) + a * previous_b (one-hot where not seen)."""
    p = softmax64(z)
    total = 0.0
    for b in range(z.shape[0]):
        a_b = a if seen[b] else 0.0
        for k in range(z.shape[1]):
            t = (1.0 - a_b) * (1.0 if k == int(y[b]) else 0.0) + a_b * float(previous[b][k])
            if t > 0:
                total -= t * math.log(float(p[b, k]))
    return total / z.shape[0]


def cd_mean64(logits, mean_logits, y, i, alpha, tau, weight=1.0):
    """Competitive mean teachers: T = argmin_j CE(m_j) (first on ties, non-finite means excluded),
    L_i = CE_i + alpha * w * tau^2 * KL(softmax(m_T/tau) || softmax(z_i/tau)); no finite mean: CE_i."""
    scores = [ce64(m, y) for m in mean_logits]
    finite = [j for j, s in enumerate(scores) if math.isfinite(s)]
    if not finite:
        return ce64(logits[i], y)
    teacher = min(finite, key=lambda j: (scores[j], j))
    return ce64(logits[i], y) + alpha * weight * kl_probs64(softmax_rows(_rows(mean_logits[teacher]), tau), logits[i], tau)
