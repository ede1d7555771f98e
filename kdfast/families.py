"""Teacher model families beside BPR-MF and LightGCN (kdfast/models.py): CML, NeuMF, Mult-VAE and
I-AutoRec, each trained with its own loss.

Every family implements one interface (BPRMF/LightGCN's, plus what a non-BPR model needs):

    kind: str                      "cml", "neumf", "multvae", "iae"
    score: str | None              "dot", "neg_sqeuclidean", or None for a scorer whose scores do
                                   not factorise (NeuMF)
    embeddings() -> (user [U, d'], item [I, d'])
                                   only when score is not None: the tables whose score function
                                   (self.score) plus key_bias() gives the model's exact scores; a
                                   per-user additive term goes in as one appended column
                                   ([W_u, b_u] . [h_i, 1], I-AutoRec)
    key_bias() -> [I] | None       per-item additive bias (Mult-VAE's decoder bias), else None
    score_pairs(users [n], items [m]) -> [n, m]
                                   the exact scores, every family (deterministic: no dropout, no
                                   sampling, Mult-VAE's z = mean)
    train_loss(users, pos, neg) -> scalar
                                   the family's training loss on a batch of (user, positive item,
                                   one sampled negative item) triples as kdfast's trainer draws them
                                   (every training pair once per epoch, shuffled, one uniform
                                   negative each); SUM-reduced over the batch like
                                   kdfast.train.bpr_loss. Mult-VAE and I-AutoRec take the batch's
                                   unique users / unique items as the rows / columns to reconstruct.
    constrain() -> None            called after each optimizer step (CML's unit-ball clip), else a
                                   no-op
    config() -> dict               {"model": kind, "dim": ..., the other hyper-parameters}

Constructors: X(n_users, n_items, dim, *, train=None, generator=None, **hyper). train is the
training interactions as an int64 CSR pair users -> items (anything kdfast.csr.as_csr accepts;
Mult-VAE and I-AutoRec require it and keep it as buffers; CML and NeuMF only check it).
Initialisation draws from `generator` (a torch.Generator; None: the global RNG) and nothing else, so
one seed gives one model. Training-time noise (Mult-VAE's dropout and reparameterisation) uses the
global RNG, which kdfast's trainer seeds. build_family(kind, ...) builds one by name (FAMILIES).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._core import checks
from ._core.csr import as_csr, row_ids, select_rows, transpose_csr
from ._core.numerics import gather_rows

# the most elements a scoring chunk materialises (n x m x width); bounds score_pairs' memory
_CHUNK_ELEMS = 1 << 24


def _param(*shape) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(*shape))


def _lecun_uniform_(w: torch.Tensor, generator) -> torch.Tensor:
    bound = math.sqrt(3.0 / w.shape[1])
    return torch.nn.init.uniform_(w, -bound, bound, generator=generator)


def _dense_rows(indptr, indices, rows: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The binary float32 matrix [len(rows), n_cols] of the given CSR rows."""
    sub_ptr, ids = select_rows(indptr, indices, rows)
    x = torch.zeros(rows.numel(), n_cols, device=indptr.device)
    x[row_ids(sub_ptr), ids] = 1.0
    return x


def _chunks(n: int, width: int):
    """Slices of range(n) whose rows times `width` elements stay under _CHUNK_ELEMS."""
    step = max(1, _CHUNK_ELEMS // max(1, width))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


class _Family(torch.nn.Module):
    """Shared argument checks and the interface's defaults."""

    kind = ""
    score: str | None = "dot"

    def __init__(self, n_users, n_items, dim, generator):
        super().__init__()
        self.n_users = checks.positive_int(n_users, "n_users")
        self.n_items = checks.positive_int(n_items, "n_items")
        self.dim = checks.positive_int(dim, "dim")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )

    def _train_csr(self, train, required: bool):
        """The training CSR (canonical int64 pair) or None; raises naming `train`."""
        if train is None:
            if required:
                raise ValueError(
                    f"train is required for {type(self).__name__}: the training interactions as "
                    f"an int64 CSR pair (indptr [{self.n_users + 1}], indices) users -> items"
                )
            return None
        return as_csr(train, "train", self.n_users, self.n_items, canonical=True)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _ids(self, x, name: str, upper: int) -> torch.Tensor:
        checks.integer(x, name, ndim=1)
        checks.index_range(x, name, upper)
        return x.to(self._device(), torch.int64)

    def _batch(self, users, pos, neg):
        for name, x in (("users", users), ("pos", pos), ("neg", neg)):
            checks.integer(x, name, ndim=1)
        if not users.shape == pos.shape == neg.shape:
            raise ValueError(
                "users, pos and neg must have the same length, got "
                f"{users.numel()}, {pos.numel()} and {neg.numel()}"
            )
        return users, pos, neg

    def embeddings(self):
        raise NotImplementedError

    def key_bias(self) -> torch.Tensor | None:
        """No per-item bias: None."""
        return None

    def constrain(self) -> None:
        """No constraint: a no-op."""

    def score_pairs(self, users, items) -> torch.Tensor:
        """[n, m] exact scores of users [n] against items [m] (int64 ids)."""
        users = self._ids(users, "users", self.n_users)
        items = self._ids(items, "items", self.n_items)
        return self._score_pairs(users, items)

    def _score_pairs(self, users, items):
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- CML
class CML(_Family):
    """Collaborative Metric Learning (Hsieh et al., "Collaborative Metric Learning", WWW 2017).

    Users and items are points in R^d; the score is s_ui = -||e_u - e_i||^2 (score
    "neg_sqeuclidean"), so the top items of a user are its nearest neighbours.

    Training loss on a batch of triples (u, i, j): sum of the hinge
        [margin + ||e_u - e_i||^2 - ||e_u - e_j||^2]_+
    over the batch. After each optimizer step constrain() clips every user and item row to the
    ball of radius clip_norm (the paper's unit-ball constraint, ||e|| <= 1). Left out of the paper's
    objective: the covariance regulariser (the paper reports it as a minor gain; it is not needed
    for the ranking), the item-feature loss, and the WARP rank weighting (it needs many negatives
    per positive; kdfast's trainer draws one, so every violated triple weighs 1).

    Hyper-parameters (defaults from the paper and its code): margin 0.5; clip_norm 1.0.
    Initialisation: N(0, std 1/sqrt(dim)) (the paper's code), then clipped to the ball.
    """

    kind = "cml"
    score = "neg_sqeuclidean"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        *,
        train=None,
        generator: torch.Generator | None = None,
        margin: float = 0.5,
        clip_norm: float = 1.0,
    ):
        super().__init__(n_users, n_items, dim, generator)
        self._train_csr(train, required=False)
        self.margin = checks.finite_positive(margin, "margin")
        self.clip_norm = checks.finite_positive(clip_norm, "clip_norm")
        self.user = _param(self.n_users, self.dim)
        self.item = _param(self.n_items, self.dim)
        with torch.no_grad():
            for w in (self.user, self.item):
                w.normal_(0.0, 1.0 / math.sqrt(self.dim), generator=generator)
        self.constrain()

    def embeddings(self):
        """(user [U, d], item [I, d]): the points themselves (with gradient); scores are
        -||e_u - e_i||^2."""
        return self.user, self.item

    def constrain(self) -> None:
        """Clip every row of both tables to norm <= clip_norm (in place, no gradient)."""
        with torch.no_grad():
            for w in (self.user, self.item):
                n = torch.linalg.vector_norm(w, dim=1, keepdim=True)
                w.mul_(torch.where(n > self.clip_norm, self.clip_norm / n, torch.ones_like(n)))

    def train_loss(self, users, pos, neg) -> torch.Tensor:
        """Sum over the batch of [margin + ||e_u - e_pos||^2 - ||e_u - e_neg||^2]_+."""
        users, pos, neg = self._batch(users, pos, neg)
        u = gather_rows(self.user, users)
        d_pos = (u - gather_rows(self.item, pos)).pow(2).sum(1)
        d_neg = (u - gather_rows(self.item, neg)).pow(2).sum(1)
        return F.relu(self.margin + d_pos - d_neg).sum()

    def _score_pairs(self, users, items):
        q, k = self.user[users], self.item[items]
        out = [
            -(q[sl, None, :] - k[None, :, :]).pow(2).sum(-1)
            for sl in _chunks(q.shape[0], k.shape[0] * self.dim)
        ]
        return torch.cat(out) if out else q.new_zeros(0, k.shape[0])

    def config(self) -> dict:
        return {
            "model": self.kind,
            "dim": self.dim,
            "margin": self.margin,
            "clip_norm": self.clip_norm,
        }


# ----------------------------------------------------------------------------------------- NeuMF
class NeuMF(_Family):
    """Neural Matrix Factorisation (He et al., "Neural Collaborative Filtering", WWW 2017).

    Two branches with their own embeddings: GMF, p_u * q_i (element-wise, size dim), and an MLP over
    [p'_u, q'_i] (size 2 * dim) through ReLU layers `layers` (default (dim, dim // 2): the tower
    2d -> d -> d/2); their outputs are concatenated into a final linear layer whose output (a logit)
    is the score. The score does not factorise into a dot product: score is None, embeddings() is
    not available, and ranking goes through score_pairs.

    Training loss: binary cross-entropy with logits, label 1 on each (u, pos) and 0 on each (u, neg)
    of the batch, summed (the paper samples 4 negatives per positive; kdfast's trainer draws one).
    No pre-training of the branches (the paper's optional GMF/MLP pre-training is left out).

    Initialisation (the paper's code): embeddings N(0, 0.01); MLP weights Glorot uniform; the
    prediction layer LeCun uniform; biases 0.
    """

    kind = "neumf"
    score = None

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        *,
        train=None,
        generator: torch.Generator | None = None,
        layers=None,
    ):
        super().__init__(n_users, n_items, dim, generator)
        self._train_csr(train, required=False)
        if layers is None:
            layers = (self.dim, max(1, self.dim // 2))
        if not isinstance(layers, (tuple, list)) or len(layers) == 0:
            raise ValueError(f"layers must be a non-empty list of layer sizes, got {layers!r}")
        self.layers = tuple(checks.positive_int(v, "layers") for v in layers)
        d = self.dim
        self.gmf_user, self.gmf_item = _param(self.n_users, d), _param(self.n_items, d)
        self.mlp_user, self.mlp_item = _param(self.n_users, d), _param(self.n_items, d)
        sizes = (2 * d, *self.layers)
        self.mlp_weight = torch.nn.ParameterList(
            [_param(sizes[k + 1], sizes[k]) for k in range(len(self.layers))]
        )
        self.mlp_bias = torch.nn.ParameterList([_param(s) for s in self.layers])
        self.out_weight = _param(d + self.layers[-1])
        self.out_bias = _param(1)
        with torch.no_grad():
            for w in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
                w.normal_(0.0, 0.01, generator=generator)
            for w, b in zip(self.mlp_weight, self.mlp_bias):
                torch.nn.init.xavier_uniform_(w, generator=generator)
                b.zero_()
            _lecun_uniform_(self.out_weight[None, :], generator)
            self.out_bias.zero_()

    def embeddings(self):
        raise NotImplementedError(
            "NeuMF's scores do not factorise into embedding tables (score is None); rank with "
            "score_pairs(users, items)"
        )

    def _tower(self, x: torch.Tensor, first_done: bool = False) -> torch.Tensor:
        for k, (w, b) in enumerate(zip(self.mlp_weight, self.mlp_bias)):
            x = torch.relu(x) if (k == 0 and first_done) else torch.relu(F.linear(x, w, b))
        return x

    def pair_logits(self, users, items) -> torch.Tensor:
        """[n] logits of the pairs (users[k], items[k]) (same-length int64 ids)."""
        d = self.dim
        gmf = gather_rows(self.gmf_user, users) * gather_rows(self.gmf_item, items)
        mlp = torch.cat([gather_rows(self.mlp_user, users), gather_rows(self.mlp_item, items)], 1)
        mlp = self._tower(mlp)
        return gmf @ self.out_weight[:d] + mlp @ self.out_weight[d:] + self.out_bias

    def train_loss(self, users, pos, neg) -> torch.Tensor:
        """Summed binary cross-entropy: label 1 on (users, pos), 0 on (users, neg)."""
        users, pos, neg = self._batch(users, pos, neg)
        logits = torch.cat([self.pair_logits(users, pos), self.pair_logits(users, neg)])
        target = torch.zeros_like(logits)
        target[: users.numel()] = 1.0
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")

    def _score_pairs(self, users, items):
        d = self.dim
        # GMF term: sum_k h_k p_uk q_ik = (p_u * h) . q_i; the first MLP layer splits into a user
        # part and an item part, so only the layers after it run on the n x m grid.
        gmf = (self.gmf_user[users] * self.out_weight[:d]) @ self.gmf_item[items].T
        w1, b1 = self.mlp_weight[0], self.mlp_bias[0]
        a = F.linear(self.mlp_user[users], w1[:, :d], b1)  # [n, l1]
        c = F.linear(self.mlp_item[items], w1[:, d:])  # [m, l1]
        out = []
        for sl in _chunks(users.numel(), items.numel() * max(self.layers)):
            x = self._tower(a[sl, None, :] + c[None, :, :], first_done=True)
            out.append(gmf[sl] + x @ self.out_weight[d:] + self.out_bias)
        return torch.cat(out) if out else gmf

    def config(self) -> dict:
        return {"model": self.kind, "dim": self.dim, "layers": list(self.layers)}


# --------------------------------------------------------------------------------------- MultVAE
class MultVAE(_Family):
    """Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018).

    A user-based variational autoencoder over the user's binary training row x_u (the model is
    built with the training CSR, kept as buffers):
        encoder: x_u / ||x_u||, dropout(p=dropout) -> Linear(I, hidden) -> tanh -> Linear(hidden,
                 2 * dim) = (mu_u, logvar_u)
        z_u = mu_u + eps * exp(logvar_u / 2) in training, z_u = mu_u at evaluation
        decoder: logits_u = W z_u + b (Linear(dim, I) with bias)
    Scores: s_ui = <mu_u, W_i> + b_i: embeddings() = (mu [U, d], W [I, d]) with score "dot" and
    key_bias() = b. (The decoder is one linear layer, not the paper's [d -> 600 -> I], so that the
    scores are a dot product plus an item bias.)

    Training loss for the batch's unique users (a user is reconstructed once per batch that holds
    one of its pairs, i.e. as often as it has interactions), summed over them:
        -sum_i x_ui log softmax(logits_u)_i  +  beta * KL(N(mu_u, exp(logvar_u)) || N(0, I))
    with beta annealed linearly from 0 to anneal_cap over anneal_steps optimizer steps (the count
    is the persistent buffer anneal_step, advanced by each train_loss call in training mode with
    gradients enabled).

    Hyper-parameters (defaults from the paper): hidden 600; dropout 0.5 (on the input); anneal_cap
    0.2; anneal_steps 40000 (the paper's beta = min(0.2, step / 200000) reaches 0.2 after 40 000
    updates). Initialisation (the paper's code): weights Glorot uniform, biases N(0, 0.001)
    truncated at 2 std.
    """

    kind = "multvae"
    score = "dot"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        *,
        train=None,
        generator: torch.Generator | None = None,
        hidden: int = 600,
        dropout: float = 0.5,
        anneal_cap: float = 0.2,
        anneal_steps: int = 40_000,
    ):
        super().__init__(n_users, n_items, dim, generator)
        indptr, indices = self._train_csr(train, required=True)
        self.hidden = checks.positive_int(hidden, "hidden")
        self.dropout = checks.probability(dropout, "dropout")
        if self.dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.anneal_cap = checks.probability(anneal_cap, "anneal_cap")
        self.anneal_steps = checks.nonneg_int(anneal_steps, "anneal_steps")
        self.register_buffer("train_indptr", indptr, persistent=False)
        self.register_buffer("train_indices", indices, persistent=False)
        self.register_buffer("anneal_step", torch.zeros((), dtype=torch.int64))
        self.enc1_weight, self.enc1_bias = _param(self.hidden, self.n_items), _param(self.hidden)
        self.enc2_weight, self.enc2_bias = _param(2 * self.dim, self.hidden), _param(2 * self.dim)
        self.dec_weight, self.dec_bias = _param(self.n_items, self.dim), _param(self.n_items)
        with torch.no_grad():
            for w in (self.enc1_weight, self.enc2_weight, self.dec_weight):
                torch.nn.init.xavier_uniform_(w, generator=generator)
            for b in (self.enc1_bias, self.enc2_bias, self.dec_bias):
                torch.nn.init.trunc_normal_(b, 0.0, 0.001, -0.002, 0.002, generator=generator)

    def beta(self) -> float:
        """The KL weight at the current step: anneal_cap * min(1, anneal_step / anneal_steps)."""
        if self.anneal_steps == 0:
            return self.anneal_cap
        return self.anneal_cap * min(1.0, int(self.anneal_step) / self.anneal_steps)

    def _rows(self, users: torch.Tensor) -> torch.Tensor:
        return _dense_rows(self.train_indptr, self.train_indices, users, self.n_items)

    def _encode(self, x: torch.Tensor, noisy: bool):
        """(mu, logvar) of binary rows x [n, I]; noisy: input dropout."""
        norm = x.sum(1, keepdim=True).sqrt()
        x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        if noisy and self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        h = torch.tanh(F.linear(x, self.enc1_weight, self.enc1_bias))
        out = F.linear(h, self.enc2_weight, self.enc2_bias)
        return out[:, : self.dim], out[:, self.dim :]

    def user_means(self, users: torch.Tensor) -> torch.Tensor:
        """mu [n, d] of the given users (no dropout), in chunks of rows."""
        out = [
            self._encode(self._rows(users[sl]), noisy=False)[0]
            for sl in _chunks(users.numel(), self.n_items)
        ]
        return torch.cat(out) if out else self.dec_weight.new_zeros(0, self.dim)

    def embeddings(self):
        """(mu [U, d], W [I, d]): s_ui = <mu_u, W_i> + key_bias()_i."""
        users = torch.arange(self.n_users, device=self.train_indptr.device)
        return self.user_means(users), self.dec_weight

    def key_bias(self) -> torch.Tensor:
        """The decoder's output bias b [I]."""
        return self.dec_bias

    def train_loss(self, users, pos, neg) -> torch.Tensor:
        """Summed multinomial NLL + beta * KL over the batch's unique users (pos, neg unused)."""
        users, pos, neg = self._batch(users, pos, neg)
        x = self._rows(torch.unique(users))
        mu, logvar = self._encode(x, noisy=self.training)
        z = mu
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = F.linear(z, self.dec_weight, self.dec_bias)
        nll = -(F.log_softmax(logits, 1) * x).sum()
        kl = 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).sum()
        # beta as a tensor op on the step buffer: no host sync per step on a GPU
        beta = self.anneal_cap
        if self.anneal_steps > 0:
            beta = beta * torch.clamp(self.anneal_step / self.anneal_steps, max=1.0)
        loss = nll + beta * kl
        if self.training and torch.is_grad_enabled():
            self.anneal_step += 1
        return loss

    def _score_pairs(self, users, items):
        return self.user_means(users) @ self.dec_weight[items].T + self.dec_bias[items]

    def config(self) -> dict:
        return {
            "model": self.kind,
            "dim": self.dim,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "anneal_cap": self.anneal_cap,
            "anneal_steps": self.anneal_steps,
        }


# --------------------------------------------------------------------------------------- I-AutoRec
class IAutoRec(_Family):
    """Item-based AutoRec (Sedhain et al., "AutoRec: Autoencoders Meet Collaborative Filtering",
    WWW 2015).

    Each item i is encoded from its column of the training matrix over users, x_i in {0, 1}^U:
        h_i = sigmoid(V x_i + mu)           (V [dim, U], hidden size dim)
        x_hat_ui = <W_u, h_i> + b_u         (W [U, dim], identity output)
    and the score is s_ui = x_hat_ui: embeddings() = ([W, b] [U, d + 1], [h, 1] [I, d + 1]) with
    score "dot", key_bias() None.

    Training loss on implicit binary data: the paper fits the observed entries only, which on
    implicit data (every observed entry is 1) is solved by predicting 1 everywhere and does not
    rank. Here the unobserved entries are zeros of weight zero_weight (0.1): the expectation of
    sampling that fraction of the zeros, without the sampling noise. For the batch's unique items
    (positives and sampled negatives) the whole column is reconstructed:
        sum_i sum_u w_ui (x_ui - x_hat_ui)^2  +  (reg / 2) (m / I) (||W||^2 + ||V||^2)
    with w_ui = 1 for observed and zero_weight for unobserved entries; m / I scales the paper's L2
    term (reg / 2)(||W||^2 + ||V||^2) of the full objective to the batch's m items.

    A batch materialises its m columns densely ([m, U], m <= 2 x the batch size), as Mult-VAE does
    its users' rows.

    Hyper-parameters: zero_weight 0.1; reg (the paper's lambda, tuned there over 0.001 .. 1000)
    1.0. Initialisation: V, W Glorot uniform, mu, b zero.
    """

    kind = "iae"
    score = "dot"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        *,
        train=None,
        generator: torch.Generator | None = None,
        zero_weight: float = 0.1,
        reg: float = 1.0,
    ):
        super().__init__(n_users, n_items, dim, generator)
        indptr, indices = self._train_csr(train, required=True)
        self.zero_weight = checks.probability(zero_weight, "zero_weight")
        if isinstance(reg, bool) or not isinstance(reg, numbers.Real):
            raise TypeError(f"reg must be a number, got {type(reg).__name__}")
        self.reg = float(reg)
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
        col_ptr, col_idx = transpose_csr((indptr, indices), self.n_items, self.n_users)
        self.register_buffer("item_indptr", col_ptr, persistent=False)
        self.register_buffer("item_indices", col_idx, persistent=False)
        self.enc_weight, self.enc_bias = _param(self.dim, self.n_users), _param(self.dim)
        self.dec_weight, self.dec_bias = _param(self.n_users, self.dim), _param(self.n_users)
        with torch.no_grad():
            for w in (self.enc_weight, self.dec_weight):
                torch.nn.init.xavier_uniform_(w, generator=generator)
            self.enc_bias.zero_()
            self.dec_bias.zero_()

    def _columns(self, items: torch.Tensor) -> torch.Tensor:
        return _dense_rows(self.item_indptr, self.item_indices, items, self.n_users)

    def item_codes(self, items: torch.Tensor) -> torch.Tensor:
        """h [m, d] of the given items, in chunks of columns."""
        out = [
            torch.sigmoid(F.linear(self._columns(items[sl]), self.enc_weight, self.enc_bias))
            for sl in _chunks(items.numel(), self.n_users)
        ]
        return torch.cat(out) if out else self.dec_weight.new_zeros(0, self.dim)

    def embeddings(self):
        """([W, b] [U, d + 1], [h, 1] [I, d + 1]): their dot products are the scores."""
        h = self.item_codes(torch.arange(self.n_items, device=self.item_indptr.device))
        user = torch.cat([self.dec_weight, self.dec_bias[:, None]], 1)
        return user, torch.cat([h, torch.ones_like(h[:, :1])], 1)

    def train_loss(self, users, pos, neg) -> torch.Tensor:
        """Weighted reconstruction of the columns of the batch's unique items (pos and neg) + L2."""
        users, pos, neg = self._batch(users, pos, neg)
        items = torch.unique(torch.cat([pos, neg]))
        sub_ptr, obs_users = select_rows(self.item_indptr, self.item_indices, items)
        obs_rows = row_ids(sub_ptr)
        x = torch.zeros(items.numel(), self.n_users, device=items.device)
        x[obs_rows, obs_users] = 1.0
        h = torch.sigmoid(F.linear(x, self.enc_weight, self.enc_bias))
        x_hat = F.linear(h, self.dec_weight, self.dec_bias)  # [m, U]
        # sum_u w_u (x_u - x_hat_u)^2 = zero_weight * sum_u x_hat_u^2
        #                              + sum_(observed u) [(1 - x_hat_u)^2 - zero_weight x_hat_u^2]
        obs = x_hat[obs_rows, obs_users]
        fit = self.zero_weight * x_hat.pow(2).sum()
        fit = fit + ((1.0 - obs).pow(2) - self.zero_weight * obs.pow(2)).sum()
        l2 = self.dec_weight.pow(2).sum() + self.enc_weight.pow(2).sum()
        return fit + 0.5 * self.reg * (items.numel() / self.n_items) * l2

    def _score_pairs(self, users, items):
        return self.dec_weight[users] @ self.item_codes(items).T + self.dec_bias[users, None]

    def config(self) -> dict:
        return {
            "model": self.kind,
            "dim": self.dim,
            "zero_weight": self.zero_weight,
            "reg": self.reg,
        }


FAMILIES = {"cml": CML, "neumf": NeuMF, "multvae": MultVAE, "iae": IAutoRec}


def build_family(
    kind: str, n_users: int, n_items: int, dim: int, train, *, generator=None, **hyper
):
    """The family `kind` ("cml", "neumf", "multvae", "iae"; see FAMILIES) built with its
    hyper-parameters (keywords of its constructor; an unknown one raises TypeError)."""
    if not isinstance(kind, str) or kind not in FAMILIES:
        raise ValueError(f"kind must be one of {tuple(FAMILIES)}, got {kind!r}")
    return FAMILIES[kind](n_users, n_items, dim, train=train, generator=generator, **hyper)


def dot_tables(model):
    """(user [U, d''], item [I, d'']) whose dot products are the model's exact scores, for any
    model with embedding tables (BPR-MF, LightGCN, and the families whose score is not None):
    the tables themselves for "dot" without bias; [u, 1] . [v, b] with a key bias;
    [2u, -1, -||u||^2] . [v, ||v||^2, 1] for "neg_sqeuclidean" (= -||u - v||^2, exact in
    arithmetic; float32 rounding about 6e-8 (||u||^2 + ||v||^2), small for CML's unit ball).
    This is how every KD method (which scores a teacher by dot products of two tables) takes such
    a teacher. ValueError for a model without tables (NeuMF: rank it with
    kdfast.topk_from_scorer(model.score_pairs, ...))."""
    score = getattr(model, "score", "dot")
    if score is None:
        raise ValueError(
            f"{type(model).__name__} has no embedding tables (its scores do not factorise into "
            "a dot product): rank it with kdfast.topk_from_scorer(model.score_pairs, ...)"
        )
    with torch.no_grad():
        user, item = (t.detach() for t in model.embeddings())
        bias = model.key_bias() if hasattr(model, "key_bias") else None
    if score == "neg_sqeuclidean":
        ones_u = user.new_ones(user.shape[0], 1)
        ones_i = item.new_ones(item.shape[0], 1)
        un, vn = (user * user).sum(1, keepdim=True), (item * item).sum(1, keepdim=True)
        user, item = torch.cat([2 * user, -ones_u, -un], 1), torch.cat([item, vn, ones_i], 1)
    elif score != "dot":
        raise ValueError(f"score must be 'dot', 'neg_sqeuclidean' or None, got {score!r}")
    if bias is not None:
        user = torch.cat([user, user.new_ones(user.shape[0], 1)], 1)
        item = torch.cat([item, bias.detach().to(item.dtype)[:, None]], 1)
    return user.contiguous(), item.contiguous()
