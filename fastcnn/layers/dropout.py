"""dropout: inverted dropout with seeded, resumable masks; identity in evaluation."""
import numpy as np

from ..schema import number
from .base import Layer, kernel_module, rows

dropout_kernels = kernel_module("dropout")


class Dropout(Layer):
    """In training each element is kept with probability 1 - rate and scaled by 1 / (1 - rate),
    else set to 0; identity in evaluation mode and for rate 0.

    The mask is a pure function of (seed, index, step, element index), computed in the kernel
    by a counter-based hash (splitmix64; the exact definition is in fastcnn/kernels/dropout.py):
    no random state, the same with any thread count, and a resumed run draws the same masks.
    ``seed`` is the model seed and ``index`` the layer's position in the model (both set by
    build_model; Sequential fills in ``index`` when it is None); ``step`` is set by
    Sequential.forward from ``model.step`` before each training forward. Used on its own, the
    layer keeps ``step`` as it is (0 unless set): the same mask on every call.
    """

    kind = "dropout"
    options = {"rate": (number(0.0, 1.0, max_exclusive=True), 0.5)}
    uses_step = True  # Sequential sets .step before each training forward

    def __init__(self, *args, seed=0, index=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = self.config["rate"]
        self.seed = 0 if seed is None else int(seed)
        self.index = index
        self.step = 0
        self._active = False

    def mask_key(self, step=None):
        """The np.uint64 key of the mask at ``step`` (default: the current step)."""
        return dropout_kernels.dropout_key(self.seed, self.index or 0, self.step if step is None else step)

    def forward(self, x, training):
        self._begin_forward(x, training)
        self._active = bool(training) and self.rate > 0.0
        if not self._active:
            return x
        x = np.ascontiguousarray(x)
        y = self._buffer("y", x.shape)
        self.mask = self._buffer("mask", x.shape, np.uint8)
        self._scale = x.dtype.type(1.0 / (1.0 - self.rate))
        dropout_kernels.dropout_forward(rows(x), self.mask_key(), dropout_kernels.dropout_threshold(self.rate),
                                        self._scale, rows(y), rows(self.mask),
                                        self.batch_shard(x.shape[0]).start * (x.size // max(1, x.shape[0])))
        return y

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not need_input_grad:
            return None
        if not self._active:  # evaluation (or rate 0): the identity
            return dy
        dx = self._buffer("dx", dy.shape)
        dropout_kernels.dropout_backward(rows(dy), rows(self.mask), dy.dtype.type(self._scale), rows(dx))
        return dx

    def onnx_nodes(self, graph, x):
        return x  # the identity in evaluation

    def describe(self):
        return f"dropout {self.rate:g}"

    def torch_module(self, torch):
        # For timing only: torch draws its own masks, so training-mode outputs differ from fastcnn's
        # (evaluation mode, and rate 0, are the identity in both).
        return torch.nn.Dropout(self.rate)
