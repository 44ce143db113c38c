"""Built-in distillation loss plugins: logit, feature and relation terms.

Logit terms: soft-target KL, Hinton's combined loss and decoupled KD. Feature terms:
MSE, FitNets, cosine, attention transfer and the CLIP-KD feature term. Relation terms,
which compare examples of one batch with each other: similarity preserving, RKD, PKT,
CRD and CKA. Every feature and relation term takes one fused embedding per example, so
a method defined on feature maps or inner layers is applied to that embedding.

A config combines terms as a weighted sum, each term named by its entry point:

```yaml
losses:
  - {name: hinton, weight: 1.0, params: {temperature: 4.0, alpha: 0.9}}
  - {name: mse, weight: 0.5}
```

Teacher tensors are targets, so every term detaches them: no gradient reaches the
teacher or the feature store it was read from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmkd.plugin_api import DistillationInputs, LossPlugin, PluginParams

__all__ = [
    "AttentionTransferLoss",
    "CKALoss",
    "CLIPKDLoss",
    "CRDLoss",
    "CosineLoss",
    "DKDLoss",
    "FeatureMSELoss",
    "FitNetsLoss",
    "HintonLoss",
    "KLDivergenceLoss",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
]


def _soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return KL(softmax(teacher / T) || softmax(student / T)), summed over classes, batch mean."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits have shape {tuple(student_logits.shape)} but teacher logits have "
            f"shape {tuple(teacher_logits.shape)}; both must be (batch, classes) with the same "
            "class order."
        )
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # F.kl_div takes the student as input and the teacher as target and sums
    # p_target * (log p_target - log p_input), so the teacher is the reference
    # distribution. "batchmean" divides that sum by the batch size.
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)


class KLDivergenceLoss(LossPlugin):
    """Soft-target KL divergence between the teacher's and the student's class distributions.

    Formula, with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

        loss = s / B * sum_b sum_c p_bc * (log p_bc - log q_bc),  s = T^2 or 1

    The teacher distribution is the target, so this is KL(p || q), not KL(q || p). The
    T^2 factor, on by default, keeps gradient magnitudes comparable across temperatures,
    as argued by Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
    (arXiv:1503.02531, 2015).

    Config example:

    ```yaml
    losses:
      - {name: kl, weight: 1.0, params: {temperature: 4.0, scale_by_t_squared: true}}
    ```

    Args:
        params: A `KLDivergenceLoss.Params`.
        student_dim: Width of the student features; unused by this term.
        teacher_dim: Width of the teacher features; unused by this term.
    """

    class Params(PluginParams):
        """Options of `KLDivergenceLoss`."""

        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T for both models."
        )
        scale_by_t_squared: bool = Field(
            default=True, description="Multiply the divergence by T^2."
        )

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher logits."""
        temperature = self.params.temperature
        divergence = _soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        if self.params.scale_by_t_squared:
            divergence = divergence * temperature**2
        return divergence


class HintonLoss(LossPlugin):
    """Knowledge distillation loss of Hinton, Vinyals & Dean: soft targets plus true labels.

    Formula, with p = softmax(teacher_logits / T) and q = softmax(student_logits / T):

        loss = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(student_logits, labels)

    KL is summed over classes and averaged over the batch. The cross-entropy uses the
    student logits at temperature 1, averaged over the batch. Source: "Distilling the
    Knowledge in a Neural Network" (arXiv:1503.02531, 2015), which also gives the T^2
    factor.

    Config example:

    ```yaml
    losses:
      - {name: hinton, weight: 1.0, params: {temperature: 4.0, alpha: 0.9}}
    ```

    Args:
        params: A `HintonLoss.Params`.
        student_dim: Width of the student features; unused by this term.
        teacher_dim: Width of the teacher features; unused by this term.
    """

    class Params(PluginParams):
        """Options of `HintonLoss`."""

        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T of the soft targets."
        )
        alpha: float = Field(
            default=0.9,
            ge=0.0,
            le=1.0,
            description="Weight of the soft-target term. The label cross-entropy gets 1 - alpha.",
        )

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the logits and the integer labels."""
        temperature = self.params.temperature
        alpha = self.params.alpha
        soft = _soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        hard = F.cross_entropy(inputs.student_logits, inputs.labels)
        return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class FeatureMSELoss(LossPlugin):
    """FitNets-style hint loss: mean squared error from projected student to teacher features.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim:

        loss = 1 / (B * D) * sum_b sum_d (W s_b + b - t_b)_d^2,  D = teacher_dim

    With `normalize`, W s_b + b and t_b are each scaled to unit L2 norm first. The
    projection is owned by this loss and trained with the student. With
    `projection: false` the student features are compared as they are, which needs
    student_dim == teacher_dim. Source: Romero et al., "FitNets: Hints for Thin Deep
    Nets" (ICLR 2015), which regresses teacher hidden layers from the student's through
    a learned regressor.

    Config example:

    ```yaml
    losses:
      - {name: mse, weight: 0.5, params: {projection: true, normalize: false}}
    ```

    Args:
        params: A `FeatureMSELoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `FeatureMSELoss`."""

        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )
        normalize: bool = Field(
            default=False, description="Scale both feature vectors to unit L2 norm before the MSE."
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection: nn.Module
        if params.projection:
            self.projection = nn.Linear(student_dim, teacher_dim)
        elif student_dim != teacher_dim:
            raise ValueError(
                f"The mse loss with projection: false needs equal feature widths, but "
                f"student_dim is {student_dim} and teacher_dim is {teacher_dim}. Set "
                "projection: true to learn a map between them."
            )
        else:
            self.projection = nn.Identity()

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student = inputs.student_features
        teacher = inputs.teacher_features.detach()
        if student.shape[-1] != self.student_dim or teacher.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"The mse loss was built for student_dim {self.student_dim} and teacher_dim "
                f"{self.teacher_dim}, but got student features of shape {tuple(student.shape)} "
                f"and teacher features of shape {tuple(teacher.shape)}."
            )

        predicted = self.projection(student)
        if self.params.normalize:
            predicted = F.normalize(predicted, dim=-1)
            teacher = F.normalize(teacher, dim=-1)
        return F.mse_loss(predicted, teacher)


# Shared checks and helpers of the feature and relation terms below.


def _checked_features(
    loss_name: str, inputs: DistillationInputs, student_dim: int, teacher_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the feature shapes, then return the student and the detached teacher features."""
    student = inputs.student_features
    teacher = inputs.teacher_features.detach()
    if (
        student.dim() != 2
        or teacher.dim() != 2
        or student.shape[1] != student_dim
        or teacher.shape[1] != teacher_dim
    ):
        raise ValueError(
            f"The {loss_name} loss was built for student_dim {student_dim} and teacher_dim "
            f"{teacher_dim}, but got student features of shape {tuple(student.shape)} and "
            f"teacher features of shape {tuple(teacher.shape)}. Pass (batch, width) tensors "
            "of those widths, or build the loss with the widths the two models output."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"The {loss_name} loss got {student.shape[0]} rows of student features but "
            f"{teacher.shape[0]} rows of teacher features. Row i of both must be the same example."
        )
    # A feature store may hold half-precision teacher features.
    return student, teacher.to(student.dtype)


def _linear_projection(
    loss_name: str, enabled: bool, student_dim: int, teacher_dim: int
) -> nn.Module:
    """Build a learned linear map from student_dim to teacher_dim, or the identity when disabled."""
    if enabled:
        return nn.Linear(student_dim, teacher_dim)
    if student_dim != teacher_dim:
        raise ValueError(
            f"The {loss_name} loss with projection: false needs equal feature widths, but "
            f"student_dim is {student_dim} and teacher_dim is {teacher_dim}. Set "
            "projection: true to learn a map between them."
        )
    return nn.Identity()


def _zero_loss(reference: torch.Tensor) -> torch.Tensor:
    """Return a zero scalar inside the autograd graph of `reference`.

    Relation terms return it for a batch with too few rows to form a pair or a triplet,
    such as the last, partial batch of an epoch, so that `backward()` still works.
    """
    return (reference * 0.0).sum()


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """Return the off-diagonal entries of a square (n, n) matrix as (n, n - 1), row by row."""
    n = matrix.shape[0]
    # Without its first entry, the flattened matrix splits into n - 1 runs of n + 1 values
    # that each end with a diagonal entry. Dropping that last column leaves the rest in
    # row order, without the host sync that boolean-mask indexing costs on a GPU.
    return matrix.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def _row_kl(target_log_probs: torch.Tensor, input_log_probs: torch.Tensor) -> torch.Tensor:
    """Return KL(target || input) of each row, from log-probabilities, summed over the last axis."""
    divergence = F.kl_div(input_log_probs, target_log_probs, reduction="none", log_target=True)
    return divergence.sum(dim=-1)


class FitNetsLoss(LossPlugin):
    """FitNets hint loss: a learned regressor maps the student features onto the teacher's.

    Formula, with r the regressor from student_dim to teacher_dim:

        r(s) = W2 relu(W1 s + b1) + b2   if hidden > 0,   r(s) = W s + b   if hidden = 0
        loss = 1 / (B * D) * sum_b sum_d (r(s_b) - t_b)_d^2,  D = teacher_dim

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). The paper
    regresses a middle teacher layer (the hint) from a middle student layer through a
    convolutional regressor, with the loss 1/2 * ||t - r(s)||^2 per example, as a first
    training stage. Here both sides are the fused embeddings, the term trains jointly with
    the others, and the squared error is averaged over batch and dimensions, so the
    paper's per-example loss is D / 2 times this value.

    Unlike `mse`, the default regressor has a hidden ReLU layer, so it can fit teacher
    features that are no linear function of the student's. With hidden: 0 this term
    equals `mse` with projection: true and normalize: false.

    Config example:

    ```yaml
    losses:
      - {name: fitnets, weight: 1.0, params: {hidden: 256}}
    ```

    Args:
        params: A `FitNetsLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `FitNetsLoss`."""

        hidden: int = Field(
            default=256,
            ge=0,
            le=65536,
            description="Width of the regressor's hidden ReLU layer, or 0 for one linear layer.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.regressor: nn.Module
        if params.hidden == 0:
            self.regressor = nn.Linear(student_dim, teacher_dim)
        else:
            self.regressor = nn.Sequential(
                nn.Linear(student_dim, params.hidden),
                nn.ReLU(),
                nn.Linear(params.hidden, teacher_dim),
            )

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("fitnets", inputs, self.student_dim, self.teacher_dim)
        return F.mse_loss(self.regressor(student), teacher)


class CosineLoss(LossPlugin):
    """Cosine embedding loss: one minus the cosine similarity of student and teacher features.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim:

        loss = 1 / B * sum_b (1 - <W s_b + b, t_b> / (||W s_b + b|| * ||t_b||))

    It matches directions only, so the student need not reproduce the teacher's feature
    norms. A zero vector on either side counts as cosine 0 (loss 1) because the norm
    product is floored at 1e-8. Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a
    distilled version of BERT: smaller, faster, cheaper and lighter" (NeurIPS 2019
    workshop on Energy Efficient Machine Learning and Cognitive Computing,
    arXiv:1910.01108), which adds this term on hidden states to align their directions.

    Config example:

    ```yaml
    losses:
      - {name: cosine, weight: 1.0, params: {projection: true}}
    ```

    Args:
        params: A `CosineLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `CosineLoss`."""

        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection = _linear_projection("cosine", params.projection, student_dim, teacher_dim)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("cosine", inputs, self.student_dim, self.teacher_dim)
        similarity = F.cosine_similarity(self.projection(student), teacher, dim=1, eps=1e-8)
        return (1.0 - similarity).mean()


class AttentionTransferLoss(LossPlugin):
    """Attention transfer: match the normalised pattern of activation magnitudes.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim and
    the attention vector a(x) = |x|^p / || |x|^p ||_2, powers taken elementwise:

        loss = 1 / B * sum_b || a(W s_b + b) - a(t_b) ||_2

    Source: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer" (ICLR 2017). The
    paper sums |A_c|^p over the channels c of a feature map to get a spatial attention map
    and compares the L2-normalised maps with the L2 norm of their difference, not its
    square, with p = 2. Here the features are one embedding per example, so each
    embedding dimension plays the part of a spatial position with a single channel.
    The paper's weight beta / 2 is left to the term's weight in the config. Widths
    usually differ, so the student is projected to teacher_dim first.

    Config example:

    ```yaml
    losses:
      - {name: attention_transfer, weight: 1.0, params: {exponent: 2.0, projection: true}}
    ```

    Args:
        params: An `AttentionTransferLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `AttentionTransferLoss`."""

        exponent: float = Field(
            default=2.0,
            ge=1.0,
            le=8.0,
            description="Power p of the magnitudes. Below 1 the gradient at 0 is infinite.",
        )
        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection = _linear_projection(
            "attention_transfer", params.projection, student_dim, teacher_dim
        )

    def _attention(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.abs().pow(self.params.exponent), dim=1)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features(
            "attention_transfer", inputs, self.student_dim, self.teacher_dim
        )
        difference = self._attention(self.projection(student)) - self._attention(teacher)
        return torch.linalg.vector_norm(difference, dim=1).mean()


class SimilarityPreservingLoss(LossPlugin):
    """Similarity-preserving distillation: match the batch's row-normalised Gram matrices.

    Formula, with S (B, student_dim) and T (B, teacher_dim) the feature matrices of the
    batch and rownorm scaling each row to unit L2 norm:

        G_s = rownorm(S S^T),  G_t = rownorm(T T^T)
        loss = 1 / B^2 * ||G_s - G_t||_F^2

    The Gram matrices are (B, B) whatever the widths, so no projection is needed. Source:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), which
    flattens the activation map of a layer into each row of S and T. Here each row is the
    fused embedding of one example.

    Config example:

    ```yaml
    losses:
      - {name: similarity_preserving, weight: 1000.0}
    ```

    Args:
        params: A `SimilarityPreservingLoss.Params`, which has no options.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `SimilarityPreservingLoss`, of which there are none."""

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features(
            "similarity_preserving", inputs, self.student_dim, self.teacher_dim
        )
        student_gram = F.normalize(student @ student.T, dim=1)
        teacher_gram = F.normalize(teacher @ teacher.T, dim=1)
        batch = student.shape[0]
        return (student_gram - teacher_gram).pow(2).sum() / batch**2


class RKDLoss(LossPlugin):
    """Relational knowledge distillation: match pairwise distances and triplet angles.

    Formula, with d_ij = ||x_i - x_j||_2 over the batch rows x of one model, mu its mean
    over the pairs i != j, and e_ij = (x_i - x_j) / d_ij:

        psi_D(i, j) = d_ij / mu                        over ordered pairs i != j
        psi_A(i, j, k) = <e_ij, e_kj>                  cosine of the angle at x_j, i, j, k distinct
        loss = w_D * mean huber(psi_D^s - psi_D^t) + w_A * mean huber(psi_A^s - psi_A^t)

    huber is the smooth L1 function with threshold 1: 0.5 * x^2 below |x| = 1, |x| - 0.5
    above. Distances and angles are compared, not coordinates, so the widths may differ
    and there is no projection. The loss is invariant to rotating, translating or
    uniformly scaling either model's features. A batch of one row gives 0, and the angle
    term is 0 for a batch of two.

    Source: Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019). The
    defaults w_D = 25 and w_A = 50 are the classification weights of public
    reimplementations such as RepDistiller. The example commands of the authors'
    metric-learning code use 1 and 2. Averaging over distinct pairs and triplets, leaving
    out the degenerate ones, is a choice made here.

    NOTE: The angle term builds a (B, B, D) tensor of differences and a (B, B, B) tensor
    of cosines, so its memory grows with the cube of the batch size.

    Config example:

    ```yaml
    losses:
      - {name: rkd, weight: 1.0, params: {distance_weight: 25.0, angle_weight: 50.0}}
    ```

    Args:
        params: An `RKDLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `RKDLoss`."""

        distance_weight: float = Field(
            default=25.0, ge=0.0, le=1000.0, description="Weight w_D of the distance term."
        )
        angle_weight: float = Field(
            default=50.0, ge=0.0, le=1000.0, description="Weight w_A of the angle term."
        )

    params: Params

    @staticmethod
    def _relations(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the normalised distances (B, B - 1) and the angle cosines (B, B, B)."""
        differences = features.unsqueeze(0) - features.unsqueeze(1)  # [j, i] = x_i - x_j
        distances = torch.linalg.vector_norm(differences, dim=2)
        pair_distances = _off_diagonal(distances)
        # The floor keeps a batch of identical rows finite, where every distance is 0.
        normalised = pair_distances / pair_distances.mean().clamp_min(1e-12)
        directions = differences / distances.clamp_min(1e-12).unsqueeze(2)
        cosines = directions @ directions.transpose(1, 2)  # [j, i, k] = <e_ij, e_kj>
        return normalised, cosines

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("rkd", inputs, self.student_dim, self.teacher_dim)
        batch = student.shape[0]
        if batch < 2:
            return _zero_loss(student)

        student_distances, student_cosines = self._relations(student)
        teacher_distances, teacher_cosines = self._relations(teacher)
        loss = self.params.distance_weight * F.smooth_l1_loss(
            student_distances, teacher_distances, beta=1.0
        )
        if batch >= 3:
            index = torch.arange(batch, device=student.device)
            distinct = (
                (index[:, None, None] != index[None, :, None])
                & (index[:, None, None] != index[None, None, :])
                & (index[None, :, None] != index[None, None, :])
            )
            elementwise = F.smooth_l1_loss(
                student_cosines, teacher_cosines, reduction="none", beta=1.0
            )
            triplets = batch * (batch - 1) * (batch - 2)
            angle = (elementwise * distinct).sum() / triplets
            loss = loss + self.params.angle_weight * angle
        return loss


class PKTLoss(LossPlugin):
    """Probabilistic knowledge transfer: match in-batch neighbour distributions of a cosine kernel.

    Formula, over the rows x_1..x_B of one model's features:

        K(x_i, x_j) = (1 + cos(x_i, x_j)) / 2
        p_{j|i} = K(x_i, x_j) / sum_{k != i} K(x_i, x_k)     for j != i
        loss = 1 / B * sum_i sum_{j != i} p^t_{j|i} * log(p^t_{j|i} / p^s_{j|i})

    The kernel is computed per model, so the widths may differ and there is no projection.
    Kernel values are floored at 1e-7 so that opposite vectors (cosine -1) keep the
    logarithm finite. A batch of one row gives 0.

    Source: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer" (ECCV 2018), which sums the divergence over all pairs. Dividing by B,
    which makes it the batch mean of one KL divergence per row, is a choice made here.

    Config example:

    ```yaml
    losses:
      - {name: pkt, weight: 1.0}
    ```

    Args:
        params: A `PKTLoss.Params`, which has no options.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `PKTLoss`, of which there are none."""

    params: Params

    @staticmethod
    def _log_conditional(features: torch.Tensor) -> torch.Tensor:
        """Return log p_{j|i} as a (B, B - 1) matrix, row i without j = i."""
        unit = F.normalize(features, dim=1)
        kernel = _off_diagonal((1.0 + unit @ unit.T) / 2.0).clamp_min(1e-7)
        return kernel.log() - kernel.sum(dim=1, keepdim=True).log()

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("pkt", inputs, self.student_dim, self.teacher_dim)
        if student.shape[0] < 2:
            return _zero_loss(student)
        divergence = _row_kl(self._log_conditional(teacher), self._log_conditional(student))
        return divergence.mean()


class CRDLoss(LossPlugin):
    """Contrastive representation distillation with in-batch negatives and a memory bank.

    Formula, with g_s and g_t learned linear heads to embed_dim, u = normalise(g_s(s_b))
    and v = normalise(g_t(t)) the unit-length embeddings, and tau the temperature:

        loss = 1 / B * sum_b -log( exp(<u_b, v_b> / tau) / sum_{c in C_b} exp(<u_b, v_c> / tau) )

    The candidates C_b are the teacher features of every row of the batch plus the
    memory bank, a first-in first-out buffer of the teacher features of up to
    `memory_size` earlier rows. Each student embedding is pulled toward its own teacher
    embedding and pushed away from the others (InfoNCE). Candidates whose raw teacher
    features equal those of row b, other than its positive, are left out of C_b. A later
    epoch puts copies of the same rows in the bank, and without that exclusion a copy of
    the positive would be a negative.

    In training mode each forward call adds the batch's teacher features to the bank,
    without gradient, after computing the loss. In eval mode the bank is read but not
    changed. The teacher is frozen, so the bank stores raw teacher features and passes
    them through the current teacher head at each call, which keeps the negatives from
    going stale.

    Source: Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR
    2020). The paper estimates the contrastive bound with NCE against 16384 negatives
    drawn from a memory bank of head outputs, updated with momentum, for both the
    student-anchored and the teacher-anchored direction. This term instead uses the
    InfoNCE softmax form, the student-anchored direction only, and by default a bank of
    4096 rows. That is fewer than the paper's, so that the bank of a small training set
    contains fewer copies of each row. The defaults embed_dim 128 and tau 0.07 follow
    the authors' public code (RepDistiller).

    Config example:

    ```yaml
    losses:
      - {name: crd, weight: 0.8, params: {embed_dim: 128, temperature: 0.07, memory_size: 4096}}
    ```

    Args:
        params: A `CRDLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `CRDLoss`."""

        embed_dim: int = Field(
            default=128,
            ge=1,
            le=65536,
            description="Width of the common space that both heads project to.",
        )
        temperature: float = Field(
            default=0.07,
            gt=0.0,
            le=10.0,
            description="Softmax temperature tau applied to the cosine similarities.",
        )
        memory_size: int = Field(
            default=4096,
            ge=0,
            le=1_000_000,
            description="Rows of past teacher features kept as negatives, or 0 for in-batch only.",
        )

    params: Params
    memory: torch.Tensor
    memory_next: torch.Tensor
    memory_filled: torch.Tensor

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.student_head = nn.Linear(student_dim, params.embed_dim)
        self.teacher_head = nn.Linear(teacher_dim, params.embed_dim)
        # Kept in the state dict, so a restored checkpoint resumes with the same negatives.
        self.register_buffer("memory", torch.zeros(params.memory_size, teacher_dim))
        self.register_buffer("memory_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss, then add the teacher features to the bank in training mode."""
        student, teacher = _checked_features("crd", inputs, self.student_dim, self.teacher_dim)
        batch = student.shape[0]
        filled = int(self.memory_filled)
        candidates = torch.cat([teacher, self.memory[:filled].to(teacher.dtype)])

        student_embedding = F.normalize(self.student_head(student), dim=1)
        teacher_embedding = F.normalize(self.teacher_head(candidates), dim=1)
        logits = student_embedding @ teacher_embedding.T / self.params.temperature

        with torch.no_grad():
            # Exact comparison: a repeated row has bitwise equal stored teacher features.
            # float32, because cdist has no bfloat16 kernel and the cast keeps equality exact.
            distances = torch.cdist(
                teacher.float(), candidates.float(), compute_mode="donot_use_mm_for_euclid_dist"
            )
            duplicate = distances == 0
            duplicate[:, :batch].fill_diagonal_(False)
        logits = logits.masked_fill(duplicate, float("-inf"))
        targets = torch.arange(batch, device=student.device)
        loss = F.cross_entropy(logits, targets)

        if self.training and self.params.memory_size > 0:
            self._enqueue(teacher)
        return loss

    @torch.no_grad()
    def _enqueue(self, teacher: torch.Tensor) -> None:
        """Write the rows into the bank, overwriting the oldest ones once it is full."""
        size = self.params.memory_size
        rows = teacher[-size:].to(self.memory.dtype)
        positions = (self.memory_next + torch.arange(rows.shape[0], device=rows.device)) % size
        self.memory[positions] = rows
        self.memory_next.copy_((self.memory_next + rows.shape[0]) % size)
        self.memory_filled.copy_(torch.clamp(self.memory_filled + rows.shape[0], max=size))


class DKDLoss(LossPlugin):
    """Decoupled knowledge distillation: target-class and non-target-class terms, weighted apart.

    Formula, for a row with label y, p = softmax(teacher_logits / T) and
    q = softmax(student_logits / T):

        TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])
        NCKD = KL(p_hat || q_hat),  p_hat_c = p_c / (1 - p_y) over the classes c != y,
                                    q_hat likewise
        loss = w * T^2 / B * sum_b (alpha * TCKD_b + beta * NCKD_b)

    Classical KD decomposes as KL(p || q) = TCKD + (1 - p_y) * NCKD, so a confident
    teacher (p_y near 1) suppresses the non-target term. DKD weights NCKD by beta instead.

    In training mode, the n-th forward call, this one included, scales the loss by the
    warm-up factor w = min(n / warmup_steps, 1). w is 1 in eval mode and when
    warmup_steps is 0. The count n is a buffer, so it is saved with the state dict. The
    term uses the logits and labels only.

    Source: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation" (CVPR
    2022). The defaults alpha = 1, beta = 8 and T = 4 are the paper's CIFAR-100 settings.
    The paper also warms the loss up linearly over its first 20 epochs, but this term
    defaults to no warm-up because the number of steps per epoch depends on the data. Set
    warmup_steps to about 20 epochs of steps to follow the paper. Scaling both terms by
    T^2, as for classical KD, is also a choice made here.

    Config example:

    ```yaml
    losses:
      - name: dkd
        weight: 1.0
        params: {alpha: 1.0, beta: 8.0, temperature: 4.0, warmup_steps: 600}
    ```

    Args:
        params: A `DKDLoss.Params`.
        student_dim: Width of the student features, unused by this term.
        teacher_dim: Width of the teacher features, unused by this term.
    """

    class Params(PluginParams):
        """Options of `DKDLoss`."""

        alpha: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of TCKD.")
        beta: float = Field(default=8.0, ge=0.0, le=100.0, description="Weight of NCKD.")
        temperature: float = Field(
            default=4.0, gt=0.0, le=100.0, description="Softmax temperature T for both models."
        )
        warmup_steps: int = Field(
            default=0,
            ge=0,
            le=10_000_000,
            description="Training-mode forward calls over which the loss ramps up, or 0 for none.",
        )

    params: Params
    steps_done: torch.Tensor

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def decoupled_terms(self, inputs: DistillationInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute TCKD and NCKD of each row, at temperature T, without the T^2 scale.

        Returns:
            Two (batch,) tensors: TCKD and NCKD.

        Raises:
            ValueError: The logits or labels have the wrong shape, fewer than 2 classes, or
                a label outside 0 .. classes - 1.
        """
        student_logits, teacher_logits = inputs.student_logits, inputs.teacher_logits.detach()
        labels = inputs.labels
        if (
            student_logits.shape != teacher_logits.shape
            or student_logits.dim() != 2
            or student_logits.shape[1] < 2
        ):
            raise ValueError(
                f"The dkd loss needs student and teacher logits of the same (batch, classes) "
                f"shape with at least 2 classes, but got {tuple(student_logits.shape)} and "
                f"{tuple(teacher_logits.shape)}."
            )
        batch, classes = student_logits.shape
        if labels.shape != (batch,):
            raise ValueError(
                f"The dkd loss needs one label per row, shape ({batch},), but got labels of "
                f"shape {tuple(labels.shape)}."
            )
        if batch > 0 and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"The dkd loss got labels from {int(labels.min())} to {int(labels.max())}, but "
                f"with {classes} classes each label must be in 0 .. {classes - 1}."
            )

        temperature = self.params.temperature
        student_scaled = student_logits / temperature
        teacher_scaled = teacher_logits.to(student_logits.dtype) / temperature
        # Row b's non-target classes are 0 .. classes - 1 without labels[b], in order.
        other = torch.arange(classes - 1, device=labels.device).unsqueeze(0)
        other = other + (other >= labels.unsqueeze(1)).long()

        def binary_and_rest(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Log-probabilities of [target, any other class] and over the other classes only,
            # both from logsumexp, so that 1 - p_y keeps its precision when p_y is near 1.
            rest = scaled.gather(1, other)
            log_total = torch.logsumexp(scaled, dim=1, keepdim=True)
            log_target = scaled.gather(1, labels.unsqueeze(1)) - log_total
            log_rest = torch.logsumexp(rest, dim=1, keepdim=True) - log_total
            return torch.cat([log_target, log_rest], dim=1), F.log_softmax(rest, dim=1)

        student_binary, student_rest = binary_and_rest(student_scaled)
        teacher_binary, teacher_rest = binary_and_rest(teacher_scaled)
        return _row_kl(teacher_binary, student_binary), _row_kl(teacher_rest, student_rest)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the logits and labels, counting steps in training mode."""
        tckd, nckd = self.decoupled_terms(inputs)
        temperature = self.params.temperature
        loss = temperature**2 * (self.params.alpha * tckd.mean() + self.params.beta * nckd.mean())
        if self.training and self.params.warmup_steps > 0:
            with torch.no_grad():
                self.steps_done += 1
            # Computed on the loss's device, so the factor adds no host sync.
            factor = torch.clamp(self.steps_done.to(loss.dtype) / self.params.warmup_steps, max=1.0)
            loss = loss * factor
        return loss


class CKALoss(LossPlugin):
    """Centred kernel alignment loss: one minus linear CKA of the batch's feature matrices.

    Formula, with X (B, student_dim) and Y (B, teacher_dim) the feature matrices of the
    batch, each centred by subtracting its column means:

        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)
        loss = 1 - CKA(X, Y)

    It is computed through the (B, B) Gram matrices, with <X X^T, Y Y^T>_F in the
    numerator, which equals the formula above and costs less when B is below the widths.
    CKA is invariant to orthogonal transforms and isotropic scaling of either side, and
    compares matrices of different widths, so there is no projection. A batch of one row
    gives 0. A side whose rows are all equal has CKA 0, so the loss is 1.

    Source: Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network
    Representations Revisited" (ICML 2019), which defines CKA for comparing
    representations. Using 1 - CKA as a distillation term is the application here.

    Config example:

    ```yaml
    losses:
      - {name: cka, weight: 1.0}
    ```

    Args:
        params: A `CKALoss.Params`, which has no options.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.
    """

    class Params(PluginParams):
        """Options of `CKALoss`, of which there are none."""

    params: Params

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("cka", inputs, self.student_dim, self.teacher_dim)
        if student.shape[0] < 2:
            return _zero_loss(student)

        student = student - student.mean(dim=0, keepdim=True)
        teacher = teacher - teacher.mean(dim=0, keepdim=True)
        student_gram = student @ student.T
        teacher_gram = teacher @ teacher.T
        alignment = (student_gram * teacher_gram).sum()
        norms = torch.linalg.matrix_norm(student_gram) * torch.linalg.matrix_norm(teacher_gram)
        tiny = torch.finfo(norms.dtype).tiny
        return 1.0 - alignment / norms.clamp_min(tiny)


class CLIPKDLoss(LossPlugin):
    """CLIP-KD on fused embeddings: a feature term plus an in-batch relation term.

    Formula, with W, b a learned linear projection from student_dim to teacher_dim, D the
    teacher width, and tau the temperature:

        feature = 1 / (B * D) * sum_b ||W s_b + b - t_b||_2^2
        P^t_i = softmax_{j != i}(cos(t_i, t_j) / tau),  P^s_i likewise from the raw s
        relation = 1 / B * sum_i KL(P^t_i || P^s_i)
        loss = feature_weight * feature + relation_weight * relation

    Source: Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation" (CVPR
    2024). There the feature term compares image and text embeddings of teacher and
    student, and the relation term matches the image-to-text contrastive distributions of
    the two models. Here there is one fused embedding per example, so the relation term
    compares each model's distribution over the other rows of the batch. The
    self-similarity is left out because it is 1 for every row in both models. The relation
    term uses the student features as they are, and only the feature term uses the
    projection. The paper uses each CLIP model's learned temperature. tau = 0.07 (CLIP's
    initial value) and equal weights are defaults chosen here, not the paper's. A batch of
    one row has a relation term of 0.

    Config example:

    ```yaml
    losses:
      - name: clip_kd
        weight: 1.0
        params: {feature_weight: 1.0, relation_weight: 1.0, temperature: 0.07}
    ```

    Args:
        params: A `CLIPKDLoss.Params`.
        student_dim: Width of the student features.
        teacher_dim: Width of the teacher features.

    Raises:
        ValueError: `projection` is false and the two widths differ.
    """

    class Params(PluginParams):
        """Options of `CLIPKDLoss`."""

        feature_weight: float = Field(
            default=1.0, ge=0.0, le=10000.0, description="Weight of the feature (MSE) term."
        )
        relation_weight: float = Field(
            default=1.0, ge=0.0, le=10000.0, description="Weight of the relation (KL) term."
        )
        temperature: float = Field(
            default=0.07,
            gt=0.0,
            le=10.0,
            description="Softmax temperature tau applied to the in-batch cosine similarities.",
        )
        projection: bool = Field(
            default=True,
            description="Learn a linear map from student_dim to teacher_dim, even if equal.",
        )

    params: Params

    def __init__(self, params: Params, *, student_dim: int, teacher_dim: int) -> None:
        super().__init__(params, student_dim=student_dim, teacher_dim=teacher_dim)
        self.projection = _linear_projection("clip_kd", params.projection, student_dim, teacher_dim)

    def _log_relations(self, features: torch.Tensor) -> torch.Tensor:
        """Return the (B, B - 1) log-softmax of each row's cosine similarities to the other rows."""
        unit = F.normalize(features, dim=1)
        similarities = _off_diagonal(unit @ unit.T) / self.params.temperature
        return F.log_softmax(similarities, dim=1)

    def forward(self, inputs: DistillationInputs) -> torch.Tensor:
        """Compute the scalar loss from the student and teacher features."""
        student, teacher = _checked_features("clip_kd", inputs, self.student_dim, self.teacher_dim)
        feature = F.mse_loss(self.projection(student), teacher)
        if student.shape[0] < 2:
            relation = _zero_loss(student)
        else:
            relation = _row_kl(self._log_relations(teacher), self._log_relations(student)).mean()
        return self.params.feature_weight * feature + self.params.relation_weight * relation
