"""kdfast.families (CML, NeuMF, Mult-VAE, I-AutoRec): each learns structure on tiny synthetic data
with its own train_loss, the exact scores agree with the embedding tables and with
kdfast.topk_scores, construction is seeded, and bad arguments are named."""

import math

import pytest
import torch

import kdfast
from kdfast._core.csr import from_lists, pair_keys, row_ids
from kdfast.families import CML, FAMILIES, IAutoRec, MultVAE, NeuMF, build_family
from kdfast.train import sample_negatives
from tests.conftest import backend_params

N_USERS, N_ITEMS, N_CLUSTERS, DIM = 60, 80, 4, 16
KINDS = list(FAMILIES)
TABLE_KINDS = [k for k in KINDS if FAMILIES[k].score is not None]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_data(seed=0):
    """Users in 4 clusters, each liking about half of its own block of 20 items, plus 2 random
    items; a random 20% (at least 1) of each user's items held out. Returns (train CSR, held-out
    lists)."""
    g = torch.Generator().manual_seed(seed)
    block = N_ITEMS // N_CLUSTERS
    train, held = [], []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        liked = {c * block + j for j in range(block) if float(torch.rand(1, generator=g)) < 0.5}
        items = sorted(liked | set(torch.randint(0, N_ITEMS, (2,), generator=g).tolist()))
        perm = torch.randperm(len(items), generator=g).tolist()
        n_held = max(1, round(0.2 * len(items)))
        held.append(sorted(items[p] for p in perm[:n_held]))
        train.append(sorted(items[p] for p in perm[n_held:]))
    return from_lists(train, N_USERS), held


@pytest.fixture(scope="module")
def data():
    return make_data()


def build(kind, train, seed=0, **hyper):
    return build_family(
        kind, N_USERS, N_ITEMS, DIM, train, generator=torch.Generator().manual_seed(seed), **hyper
    )


def fit(model, train, epochs, *, lr=1e-2, batch_size=128, seed=0):
    """The trainer's sampling in a local loop: every training pair once per epoch, shuffled, one
    uniform negative outside the user's training items; Adam; constrain() after each step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    users_all, items = row_ids(train[0]), train[1]
    keys = pair_keys(*train, N_ITEMS)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(items.numel(), generator=gen)
        users, pos = users_all[perm], items[perm]
        neg = sample_negatives(users, keys, N_ITEMS, gen)
        for s in range(0, users.numel(), batch_size):
            sl = slice(s, s + batch_size)
            loss = model.train_loss(users[sl], pos[sl], neg[sl])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.constrain()
    model.eval()
    return model


def recall_at(model, train, held, k=10):
    """(held-out Recall@k ranking all non-training items, its expectation for a random
    ranking)."""
    with torch.no_grad():
        s = model.score_pairs(torch.arange(N_USERS), torch.arange(N_ITEMS))
    s[row_ids(train[0]), train[1]] = float("-inf")
    top = s.topk(k, 1).indices
    rec = [len(set(top[u].tolist()) & set(h)) / len(h) for u, h in enumerate(held)]
    n_cand = (N_ITEMS - (train[0][1:] - train[0][:-1])).double()
    return sum(rec) / N_USERS, float((k / n_cand).mean())


def table_scores(model):
    """The score function of model.score on embeddings() plus key_bias(), in float64."""
    u, i = (t.detach().double() for t in model.embeddings())
    if model.score == "dot":
        s = u @ i.T
    else:
        assert model.score == "neg_sqeuclidean"
        s = -((u[:, None, :] - i[None, :, :]) ** 2).sum(-1)
    bias = model.key_bias()
    return s if bias is None else s + bias.detach().double()


# ------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", KINDS)
def test_family_learns_cluster_structure(kind, data):
    train, held = data
    model = fit(build(kind, train), train, epochs=30)
    rec, rnd = recall_at(model, train, held)
    assert rec > 2 * rnd, f"{kind}: Recall@10 {rec:.3f}, random {rnd:.3f}"
    untrained, _ = recall_at(build(kind, train, seed=1).eval(), train, held)
    assert rec > untrained + 0.1


# --------------------------------------------------------------------------- scores and top-k
def trained_a_little(kind, train, **hyper):
    """A model a few steps away from its initialisation (biases and codes no longer at 0)."""
    return fit(build(kind, train, **hyper), train, epochs=3)


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_score_pairs_is_the_score_function_on_embeddings(kind, data):
    train, _ = data
    model = trained_a_little(kind, train)
    with torch.no_grad():
        full = model.score_pairs(torch.arange(N_USERS), torch.arange(N_ITEMS))
        expect = table_scores(model)
        assert full.shape == (N_USERS, N_ITEMS) and full.dtype == torch.float32
        torch.testing.assert_close(full.double(), expect, atol=1e-5, rtol=1e-5)
        users, items = torch.tensor([5, 0, 5, 59]), torch.tensor([79, 3, 3, 0, 41])
        torch.testing.assert_close(model.score_pairs(users, items), full[users][:, items])
        # training mode changes nothing: no dropout, no sampling, z = mean
        model.train()
        torch.testing.assert_close(model.score_pairs(users, items), full[users][:, items])
    u, i = model.embeddings()
    assert u.shape[0] == N_USERS and i.shape[0] == N_ITEMS and u.shape[1] == i.shape[1]


@pytest.mark.parametrize("backend", backend_params("torch", "cpp"))
@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_topk_scores_ranks_like_score_pairs(kind, backend, data):
    train, _ = data
    model = trained_a_little(kind, train)
    k = 10
    with torch.no_grad():
        dense = model.score_pairs(torch.arange(N_USERS), torch.arange(N_ITEMS))
        user, item = model.embeddings()
        bias = model.key_bias()
        for exclude in (None, train):
            s = dense.clone()
            if exclude is not None:
                s[row_ids(train[0]), train[1]] = float("-inf")
            want = torch.sort(s, dim=1, descending=True, stable=True)
            values, index = kdfast.topk_scores(
                user.contiguous(),
                item.contiguous(),
                k,
                exclude=exclude,
                score=model.score,
                key_bias=bias,
                backend=backend,
            )
            assert torch.equal(index, want.indices[:, :k])
            torch.testing.assert_close(values, want.values[:, :k], atol=1e-5, rtol=1e-5)


def test_neumf_scores_are_its_pair_logits(data):
    train, _ = data
    model = trained_a_little("neumf", train)
    with torch.no_grad():
        full = model.score_pairs(torch.arange(N_USERS), torch.arange(N_ITEMS))
        uu, ii = torch.meshgrid(torch.arange(N_USERS), torch.arange(N_ITEMS), indexing="ij")
        pairs = model.pair_logits(uu.reshape(-1), ii.reshape(-1)).view(N_USERS, N_ITEMS)
    torch.testing.assert_close(full, pairs, atol=1e-5, rtol=1e-5)
    assert model.score is None and model.key_bias() is None
    with pytest.raises(NotImplementedError, match="score_pairs"):
        model.embeddings()
    # not a rank-d factorisation in general: the grid of scores has more than dim + 1 directions
    assert int(torch.linalg.matrix_rank(full.double(), atol=1e-6)) > DIM + 1


# ------------------------------------------------------------------------ family-specific rules
def test_cml_constrain_clips_to_the_unit_ball(data):
    model = build("cml", data[0])
    for w in (model.user, model.item):
        assert float(torch.linalg.vector_norm(w.detach(), dim=1).max()) <= 1.0 + 1e-6
    with torch.no_grad():
        model.user[0] = 3.0
        model.item[1] = 0.0
        inside = model.user[2].clone()
    model.constrain()
    assert math.isclose(float(torch.linalg.vector_norm(model.user[0].detach())), 1.0, rel_tol=1e-6)
    assert torch.equal(model.item[1], torch.zeros(DIM))
    assert torch.equal(model.user[2], inside)
    fit(model, data[0], epochs=2, lr=0.1)
    for w in (model.user, model.item):
        assert float(torch.linalg.vector_norm(w.detach(), dim=1).max()) <= 1.0 + 1e-6


def test_cml_loss_is_the_hinge_on_squared_distances():
    model = CML(2, 3, 2, margin=0.5)
    with torch.no_grad():
        model.user.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        model.item.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5], [1.0, 0.0]]))
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([2, 1])
    # user 0: 0.25 - 1 + 0.5 < 0 -> 0; user 1: 0 - 1.25 + 0.5 < 0 -> 0; swap pos/neg: 1.25 + 1.75
    assert float(model.train_loss(users, pos, neg).detach()) == 0.0
    assert math.isclose(
        float(model.train_loss(users, neg, pos).detach()), 1.25 + 1.75, rel_tol=1e-6
    )


def test_neumf_loss_is_binary_cross_entropy(data):
    model = trained_a_little("neumf", data[0])
    users, pos, neg = torch.tensor([0, 7, 7]), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    lp, ln = model.pair_logits(users, pos), model.pair_logits(users, neg)
    want = -(torch.log(torch.sigmoid(lp)).sum() + torch.log(1 - torch.sigmoid(ln)).sum())
    torch.testing.assert_close(model.train_loss(users, pos, neg), want, atol=1e-4, rtol=1e-5)


def test_multvae_loss_is_multinomial_likelihood_plus_kl(data):
    train, _ = data
    model = trained_a_little("multvae", train)  # eval mode: no dropout, z = mean
    model.anneal_step.fill_(7)
    model.anneal_steps = 10
    users = torch.tensor([3, 1, 3, 8])
    x = torch.zeros(3, N_ITEMS)
    for r, u in enumerate([1, 3, 8]):
        x[r, train[1][train[0][u] : train[0][u + 1]]] = 1.0
    out = model.enc2_weight @ torch.tanh(
        model.enc1_weight @ (x / x.sum(1, keepdim=True).sqrt()).T + model.enc1_bias[:, None]
    )
    out = out.T + model.enc2_bias
    mu, logvar = out[:, :DIM], out[:, DIM:]
    logits = mu @ model.dec_weight.T + model.dec_bias
    nll = -(torch.log_softmax(logits, 1) * x).sum()
    kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum()
    got = model.train_loss(users, users, users)
    torch.testing.assert_close(got, nll + 0.2 * 0.7 * kl, atol=1e-3, rtol=1e-5)


def test_iautorec_loss_is_weighted_reconstruction_plus_l2(data):
    train, _ = data
    model = trained_a_little("iae", train, zero_weight=0.25, reg=0.5)
    pos, neg = torch.tensor([3, 9, 3]), torch.tensor([9, 40, 77])
    items = torch.tensor([3, 9, 40, 77])
    x = torch.zeros(N_USERS, N_ITEMS)
    x[row_ids(train[0]), train[1]] = 1.0
    x = x[:, items].T  # the items' columns over users
    h = torch.sigmoid(x @ model.enc_weight.T + model.enc_bias)
    x_hat = h @ model.dec_weight.T + model.dec_bias
    w = torch.where(x > 0, 1.0, 0.25)
    l2 = model.dec_weight.pow(2).sum() + model.enc_weight.pow(2).sum()
    want = (w * (x - x_hat) ** 2).sum() + 0.5 * 0.5 * (4 / N_ITEMS) * l2
    got = model.train_loss(torch.tensor([0, 1, 2]), pos, neg)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["neumf", "multvae", "iae"])
def test_constrain_is_a_no_op_elsewhere(kind, data):
    model = build(kind, data[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.constrain()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_multvae_beta_anneals_linearly_and_is_state(data):
    train, _ = data
    model = build("multvae", train, anneal_cap=0.2, anneal_steps=10)
    batch = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 3])
    assert model.beta() == 0.0
    for step in range(1, 16):
        model.train_loss(*batch)
        assert math.isclose(model.beta(), 0.2 * min(1.0, step / 10))
    assert int(model.state_dict()["anneal_step"]) == 15
    model.eval()
    model.train_loss(*batch)
    with torch.no_grad():
        model.train()
        model.train_loss(*batch)
    assert int(model.anneal_step) == 15
    assert build("multvae", train, anneal_steps=0).beta() == 0.2
    fresh = build("multvae", train)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.anneal_step) == 15


def test_iautorec_embeddings_carry_the_user_bias(data):
    train, _ = data
    model = trained_a_little("iae", train)
    u, i = model.embeddings()
    assert u.shape == (N_USERS, DIM + 1) and i.shape == (N_ITEMS, DIM + 1)
    assert torch.equal(u[:, -1], model.dec_bias) and torch.equal(i[:, -1], torch.ones(N_ITEMS))
    assert float(model.dec_bias.detach().abs().max()) > 0


# ------------------------------------------------------------------ seeds, losses and arguments
@pytest.mark.parametrize("kind", KINDS)
def test_seeded_construction_is_reproducible(kind, data):
    train, _ = data
    rng = torch.random.get_rng_state()
    a, b, c = build(kind, train, seed=3), build(kind, train, seed=3), build(kind, train, seed=4)
    assert torch.equal(rng, torch.random.get_rng_state()), "construction used the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    cfg = a.config()
    assert cfg["model"] == kind == a.kind and cfg["dim"] == DIM
    hyper = {k: v for k, v in cfg.items() if k not in ("model", "dim")}
    again = build(kind, train, seed=3, **hyper)
    assert again.config() == cfg


@pytest.mark.parametrize("kind", KINDS)
def test_train_loss_is_finite_with_gradients(kind, data):
    train, _ = data
    model = build(kind, train)
    users, pos = row_ids(train[0])[:50], train[1][:50]
    neg = sample_negatives(users, pair_keys(*train, N_ITEMS), N_ITEMS, torch.Generator())
    torch.manual_seed(0)
    loss = model.train_loss(users, pos, neg)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name
    with pytest.raises(ValueError, match="same length"):
        model.train_loss(users, pos[:-1], neg)
    with pytest.raises(TypeError, match="pos"):
        model.train_loss(users, pos.float(), neg)


@pytest.mark.parametrize("kind", KINDS)
def test_score_pairs_checks_ids(kind, data):
    model = build(kind, data[0])
    with pytest.raises(ValueError, match="users"):
        model.score_pairs(torch.tensor([N_USERS]), torch.tensor([0]))
    with pytest.raises(ValueError, match="items"):
        model.score_pairs(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(TypeError, match="items"):
        model.score_pairs(torch.tensor([0]), torch.tensor([0.0]))
    assert model.score_pairs(torch.tensor([1]), torch.zeros(0, dtype=torch.int64)).shape == (1, 0)


@pytest.mark.parametrize(
    "kind, kwargs, exc, name",
    [
        ("cml", {"n_users": 0}, ValueError, "n_users"),
        ("neumf", {"n_items": -3}, ValueError, "n_items"),
        ("iae", {"dim": 2.5}, TypeError, "dim"),
        ("multvae", {"dim": True}, TypeError, "dim"),
        ("cml", {"margin": -0.5}, ValueError, "margin"),
        ("cml", {"margin": float("inf")}, ValueError, "margin"),
        ("cml", {"clip_norm": 0}, ValueError, "clip_norm"),
        ("neumf", {"layers": []}, ValueError, "layers"),
        ("neumf", {"layers": [8, 0]}, ValueError, "layers"),
        ("multvae", {"hidden": 0}, ValueError, "hidden"),
        ("multvae", {"dropout": 1.0}, ValueError, "dropout"),
        ("multvae", {"anneal_cap": 1.5}, ValueError, "anneal_cap"),
        ("multvae", {"anneal_steps": -1}, ValueError, "anneal_steps"),
        ("multvae", {"train": None}, ValueError, "train"),
        ("iae", {"train": None}, ValueError, "train"),
        ("iae", {"zero_weight": 2.0}, ValueError, "zero_weight"),
        ("iae", {"reg": -1.0}, ValueError, "reg"),
        ("iae", {"reg": "big"}, TypeError, "reg"),
        ("cml", {"generator": 0}, TypeError, "generator"),
        ("cml", {"train": (torch.tensor([0, 1]), torch.tensor([0]))}, ValueError, "train"),
        ("multvae", {"train": (torch.tensor([0, 1]), torch.tensor([0]))}, ValueError, "train"),
        ("iae", {"train": "ratings.csv"}, TypeError, "train"),
    ],
)
def test_bad_arguments_are_named(kind, kwargs, exc, name, data):
    args = {"n_users": N_USERS, "n_items": N_ITEMS, "dim": DIM, "train": data[0]}
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        FAMILIES[kind](args.pop("n_users"), args.pop("n_items"), args.pop("dim"), **args)


def test_build_family(data):
    train, _ = data
    assert FAMILIES == {"cml": CML, "neumf": NeuMF, "multvae": MultVAE, "iae": IAutoRec}
    m = build_family("neumf", N_USERS, N_ITEMS, 8, train, layers=(8, 4, 2))
    assert isinstance(m, NeuMF) and m.config() == {"model": "neumf", "dim": 8, "layers": [8, 4, 2]}
    assert build_family("cml", N_USERS, N_ITEMS, 8, None).score == "neg_sqeuclidean"
    with pytest.raises(ValueError, match="kind"):
        build_family("ncf", N_USERS, N_ITEMS, 8, train)
    with pytest.raises(TypeError, match="momentum"):
        build_family("cml", N_USERS, N_ITEMS, 8, train, momentum=0.9)
