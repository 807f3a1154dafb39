"""The Inception-I3D video network (Carreira & Zisserman 2017) in the state-dict
layout of the PyTorch port most FVD code loads (`rgb_imagenet.pt`,
`i3d_pretrained_400.pt`: keys `Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.*`,
`logits.conv3d.*`), so such a file loads here as it is. TensorFlow's SAME
padding, batch norm with eps 1e-3. `width` scales every channel count (a
stand-in network for tests); it is read back from the stem's weight."""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the inception modules: (name, [1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool projection]), with the
# max pools (kernel, stride) between them
LAYOUT = [
    ("MaxPool3d_3a_3x3", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", [64, 96, 128, 16, 32, 32]), ("Mixed_3c", [128, 128, 192, 32, 96, 64]),
    ("MaxPool3d_4a_3x3", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", [192, 96, 208, 16, 48, 64]), ("Mixed_4c", [160, 112, 224, 24, 64, 64]),
    ("Mixed_4d", [128, 128, 256, 24, 64, 64]), ("Mixed_4e", [112, 144, 288, 32, 64, 64]),
    ("Mixed_4f", [256, 160, 320, 32, 128, 128]),
    ("MaxPool3d_5a_2x2", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", [256, 160, 320, 32, 128, 128]), ("Mixed_5c", [384, 192, 384, 48, 128, 128]),
]


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list:
    """F.pad's list (last dimension first) for TensorFlow's SAME padding."""
    pads = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), norm: bool = True):
        super().__init__()
        self.kernel, self.stride, self.norm = kernel, stride, norm
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return F.relu(self.bn(x)) if self.norm else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class Inception(nn.Module):
    def __init__(self, cin: int, c: Sequence[int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    def __init__(self, num_classes: int = 400, width: float = 1.0):
        super().__init__()
        ch = lambda c: max(1, round(c * width))  # noqa: E731
        self.Conv3d_1a_7x7 = Unit3D(3, ch(64), (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(ch(64), ch(64))
        self.Conv3d_2c_3x3 = Unit3D(ch(64), ch(192), (3, 3, 3))
        self.blocks, channels = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3"], ch(192)
        for name, spec in LAYOUT:
            if name.startswith("MaxPool"):
                self.add_module(name, MaxPoolSame(*spec))
            else:
                widths = [ch(c) for c in spec]
                self.add_module(name, Inception(channels, widths))
                channels = widths[0] + widths[2] + widths[4] + widths[5]
            self.blocks.append(name)
        self.logits = Unit3D(channels, num_classes, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clips [N, 3, T, 224, 224] in [-1, 1] -> the class logits [N, classes], averaged over time."""
        for name in self.blocks:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (min(2, x.shape[2]), 7, 7), stride=1)  # short clips pool what time they have
        return self.logits(x).mean(dim=(2, 3, 4))


def from_state_dict(state: Dict[str, torch.Tensor]) -> InceptionI3d:
    """The network a state dict of this layout describes (its width and class count read off it)."""
    width = state["Conv3d_1a_7x7.conv3d.weight"].shape[0] / 64
    network = InceptionI3d(state["logits.conv3d.weight"].shape[0], width)
    network.load_state_dict(state)
    return network
