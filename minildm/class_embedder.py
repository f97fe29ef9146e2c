"""ClassEmbedder: class labels as the condition, one learned token per class (the LDM paper's class-conditional models).

The LDM paper's class-conditional ImageNet models (Rombach et al. 2022, section 4.1 and table 3; CompVis'
`ldm.modules.encoders.modules.ClassEmbedder`) give each class one learned vector and feed it to the UNet's
cross-attention as a sequence of one token:

    τ_θ(y) = embedding[y][None],   (B,) class indices -> (B, 1, D)

With one token, each cross-attention layer's softmax is 1 on it: the layer adds the same projected value at every
position, a learned per-class signal. For classifier-free guidance (Ho & Salimans 2022) the table has one more
row, the null class (index num_classes), which training swaps in for a dropped label and sampling uses for the
unconditional prediction (CompVis' ClassEmbedder does the same with its ucg_rate).

It fills the conditioner slot (interfaces.Conditioner) with class names as the conditions: the pipeline's
conditions are strings, so a class goes in by its name ("7") and the null condition is "", as for text;
LatentDiffusion.generate(class_labels=[...]) maps integer labels to names (condition_names). Depends on torch.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class ClassEmbedderConfig:
    num_classes: int
    hidden_size: int = 128  # D, the backbone's cross_attention_dim
    class_names: list[str] = field(default_factory=list)  # default: "0", "1", ..., one per class

    def __post_init__(self):
        for name in ("num_classes", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.class_names = list(self.class_names) if self.class_names else [str(k) for k in range(self.num_classes)]
        if len(self.class_names) != self.num_classes or not all(isinstance(n, str) and n for n in self.class_names):
            raise ValueError(f"class_names must be {self.num_classes} non-empty strings, one per class, got "
                             f"{self.class_names!r:.120}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be distinct, got {self.class_names!r:.120}")


class ClassEmbedder(nn.Module):
    """Class names (or "" for the null class) -> encoder_hidden_states (B, 1, D): one learned token per class.

    `embedding` has num_classes + 1 rows; row num_classes is the null class of classifier-free guidance.
    encode(conditions) raises ValueError for a name that is not a class, naming the classes.
    """

    null_condition = ""  # the unconditional input of classifier-free guidance: the null class

    def __init__(self, config: ClassEmbedderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_classes + 1, config.hidden_size)  # the last row: the null class
        self.index = {name: k for k, name in enumerate(config.class_names)}
        self.index[self.null_condition] = config.num_classes

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def null_class(self) -> int:
        """The embedding row of the null class: num_classes."""
        return self.config.num_classes

    def condition_names(self, class_labels) -> list[str]:
        """Integer labels (a list, or a (B,) integer tensor) in [0, num_classes) -> their class names, the
        conditions encode() takes. Raises TypeError / ValueError for anything else, naming the valid range."""
        if torch.is_tensor(class_labels):
            if class_labels.ndim != 1 or class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise TypeError(f"class_labels must be a list of integers or a (B,) integer tensor, got a "
                                f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}")
            class_labels = class_labels.tolist()
        if isinstance(class_labels, numbers.Integral):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or len(class_labels) == 0 or \
                not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in class_labels):
            raise TypeError(f"class_labels must be a non-empty list of integers, got {class_labels!r:.80}")
        unknown = [int(k) for k in class_labels if not 0 <= k < self.num_classes]
        if unknown:
            raise ValueError(f"class_labels must be in [0, {self.num_classes}) (this model's classes: "
                             f"{', '.join(self.class_names[:12])}{' ...' if self.num_classes > 12 else ''}), got "
                             f"{unknown[:5]}")
        return [self.config.class_names[int(k)] for k in class_labels]

    def indices(self, conditions: list[str]) -> torch.Tensor:
        """Class names ("" = the null class) -> their embedding rows (B,) int64. Raises ValueError for another name."""
        if isinstance(conditions, str):
            conditions = [conditions]
        if not isinstance(conditions, (list, tuple)) or len(conditions) == 0:
            raise ValueError(f"conditions must be a non-empty list of class names, got {conditions!r:.80}")
        unknown = [c for c in conditions if c not in self.index]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a class of this class-conditional model; its classes are "
                             f"{', '.join(repr(n) for n in self.class_names[:12])}"
                             f"{' ...' if self.num_classes > 12 else ''} (or '' for none); "
                             f"generate(class_labels=[...]) takes their indices")
        return torch.tensor([self.index[c] for c in conditions], dtype=torch.long)

    def forward(self, class_indices: torch.Tensor) -> torch.Tensor:
        """Embedding rows (B,) int64 in [0, num_classes] -> (B, 1, D); num_classes is the null class."""
        return self.embedding(class_indices)[:, None]  # (B, D) -> (B, 1, D): a sequence of one token

    def encode(self, conditions: list[str]) -> torch.Tensor:
        """Class names (or "" for the null class) -> encoder_hidden_states (B, 1, D) on this module's device."""
        return self(self.indices(conditions).to(self.embedding.weight.device))

    def tokens(self, condition: str) -> list[str]:
        """The label of encode()'s one position: the class name (or "<null>")."""
        return [condition if condition != self.null_condition else "<null>"]

    def ignored_words(self, condition: str) -> dict[str, list[str]]:
        """Nothing is ignored: a class name is used whole, and another string is refused by encode()."""
        return {}

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config_dict(cls, config: dict) -> ClassEmbedder:
        return cls(ClassEmbedderConfig(**config))
