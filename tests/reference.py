"""Float64 reference formulas written straight from method.md, independent of kdarena's code."""
import math



def softmax64(z, tau=1.0):
    z = z.detach().double() / tau
    z = z - z.max(dim=1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=1, keepdim=True)


def kl64(teacher, student, tau=1.0):
    """KL(p_t || p_s) * tau^2 averaged over the batch, by the textbook formula."""
    pt, ps = softmax64(teacher, tau), softmax64(student, tau)
    total = 0.0
    for b in range(pt.shape[0]):
        for k in range(pt.shape[1]):
            if pt[b, k] > 0:
                total += float(pt[b, k]) * (math.log(float(pt[b, k])) - math.log(float(ps[b, k])))
    return total / pt.shape[0] * tau * tau


def ce64(z, y):
    p = softmax64(z)
    return -sum(math.log(float(p[b, y[b]])) for b in range(z.shape[0])) / z.shape[0]
