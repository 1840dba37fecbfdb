"""A backbone that is an ONNX graph (``fewshot-studio import-backbone``): any image-embedding
model exported to ONNX (a DINOv2 or CLIP image encoder, say) used as a FewShot Studio
backbone.

The checkpoint holds the graph itself: its bytes are the ``graph`` buffer, a ``uint8``
tensor in the ``.safetensors`` file beside the (here: no) weights, so a checkpoint stays one
self-contained file that loads without unpickling. ``graph_bytes`` in the config states its
length, so the usual shape check (:func:`~fewshot_studio.io.checkpoint.check_shapes`)
refuses a file whose graph was cut short. The graph's input is fed as the checkpoint's
:class:`~fewshot_studio.data.preprocess.Preprocess` prepares it (size, mean/std), in the
graph's own ``layout`` ("NCHW" or "NHWC"); its output ``(n, d)`` (or ``(n, C, h, w)`` maps)
is the backbone's output. ONNX Runtime runs it on the CPU; it has no gradients, so an ONNX
backbone cannot be fine-tuned (a timm backbone, ``timm_model.py``, can). It cannot be
traced either: the engine's ONNX Runtime backend runs the graph itself, composed with the
method's pooling
(:meth:`OnnxGraph.embed_graph`, declared by :meth:`OnnxGraph.onnx_graph`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models.registry import BACKBONES, BackboneCfg

LAYOUTS = ("NCHW", "NHWC")


def fixed_batch(session: Any) -> int:
    """An ONNX Runtime session's fixed batch size: its input's first dimension when that is
    a number, else 0 (any batch)."""
    fixed = session.get_inputs()[0].shape[0]
    return fixed if isinstance(fixed, int) and fixed > 0 else 0


def run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, fixed: int
                ) -> np.ndarray:
    """``run`` on ``x (n, ...)``: at once when ``fixed`` is 0, else ``fixed`` rows a call (a
    graph exported with a fixed batch size), the last call's rows padded to ``fixed`` with
    copies of its last row and their outputs dropped. -> ``(n, ...)``."""
    if fixed <= 0:
        return run(np.ascontiguousarray(x))
    outs = []
    for i in range(0, max(1, x.shape[0]), fixed):
        chunk = x[i:i + fixed]
        short = fixed - chunk.shape[0]
        if short:
            pad = (np.repeat(chunk[-1:], short, axis=0) if chunk.shape[0]
                   else np.zeros((short, *x.shape[1:]), x.dtype))
            chunk = np.concatenate([chunk, pad])
        outs.append(run(np.ascontiguousarray(chunk))[:fixed - short])
    return np.concatenate(outs)


@BACKBONES.register("onnx", cfg=BackboneCfg(Preprocess(  # no gradients: not trainable
    image_size=224, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="center_crop"),
    trainable=False))
class OnnxGraph(nn.Module):
    """``(n, C, H, W)`` float images -> the ONNX graph's output, ``(n, *feature_shape)``.

    ``graph_bytes``: the length of the serialised ONNX model held in the ``graph`` buffer
    (filled by ``load_state_dict`` or :meth:`set_graph`); ``input_name`` / ``output_name``:
    the graph's input and output; ``layout``: what the graph's input expects, "NCHW" or
    "NHWC"; ``feature_shape``: its output per image."""

    def __init__(self, in_channels: int = 3, image_size: int = 224, graph_bytes: int = 0,
                 input_name: str = "", output_name: str = "", layout: str = "NCHW",
                 feature_shape: tuple[int, ...] | list[int] = (1,),
                 track_running_stats: bool = True) -> None:
        super().__init__()
        if not track_running_stats:
            raise ValueError("an ONNX graph keeps its own normalisation: it cannot use batch "
                             "statistics (full MAML)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if graph_bytes < 0:
            raise ValueError(f"graph_bytes must be >= 0, got {graph_bytes}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.input_name = input_name
        self.output_name = output_name
        self.layout = layout
        self.feature_shape = tuple(int(n) for n in feature_shape)
        self.out_channels = self.feature_shape[0]
        self.register_buffer("graph", torch.zeros(int(graph_bytes), dtype=torch.uint8))
        self._session: Any = None
        self._lock = threading.Lock()

    def set_graph(self, data: bytes) -> None:
        """Hold the serialised ONNX model ``data``."""
        self.graph = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._session = None

    def _load_from_state_dict(self, *args: Any) -> None:
        """A new graph drops the session of the old one."""
        self._session = None
        super()._load_from_state_dict(*args)

    def feature_shape_for(self, image_size: int) -> tuple[int, ...]:
        """The graph's output per image (fixed by the graph; ``image_size`` is its input)."""
        return self.feature_shape

    def config(self) -> dict[str, Any]:
        """Constructor kwargs."""
        return {"in_channels": self.in_channels, "image_size": self.image_size,
                "graph_bytes": int(self.graph.numel()), "input_name": self.input_name,
                "output_name": self.output_name, "layout": self.layout,
                "feature_shape": list(self.feature_shape)}

    def onnx_graph(self) -> bytes:
        """The held serialised ONNX model: this backbone declares that it carries a ready
        graph (the engine runs it, see :meth:`embed_graph`, instead of exporting)."""
        return self.graph.cpu().numpy().tobytes()

    def embed_graph(self, pool: str, input_name: str, output_name: str) -> bytes:
        """The held graph as a method's ``embed``: ``input_name`` ``(n, C, H, W)`` float32
        -> ``output_name`` ``(n, d)`` float32, i.e. the layout transposed in front, then a cast
        to float32, global average pooling of ``(n, C, h, w)`` maps when ``pool`` is "avg",
        and a flatten (ProtoNet's ``embed``). The graph's own names get a prefix, so they
        cannot clash; its batch axis (fixed or not) is kept."""
        import onnx
        from onnx import TensorProto, compose, helper

        prefix = "fs_graph/"
        model = compose.add_prefix(onnx.load_model_from_string(self.onnx_graph()), prefix)
        g = model.graph
        src = next(i for i in g.input if i.name == prefix + self.input_name)
        batch = src.type.tensor_type.shape.dim[0]
        n: int | str = batch.dim_value if batch.HasField("dim_value") else "batch"
        c, s = self.in_channels, self.image_size
        head = [helper.make_node("Transpose", [input_name], [src.name], perm=[0, 2, 3, 1])
                if self.layout == "NHWC" else
                helper.make_node("Identity", [input_name], [src.name])]
        tail = [helper.make_node("Cast", [prefix + self.output_name], [prefix + "cast"],
                                 to=TensorProto.FLOAT)]
        last = prefix + "cast"
        if pool == "avg" and len(self.feature_shape) == 3:
            tail.append(helper.make_node("GlobalAveragePool", [last], [prefix + "pooled"]))
            last = prefix + "pooled"
        tail.append(helper.make_node("Flatten", [last], [output_name], axis=1))
        d = self.feature_shape[0] if pool == "avg" else int(np.prod(self.feature_shape))
        nodes = [*head, *g.node, *tail]
        del g.node[:]
        g.node.extend(nodes)
        g.input.remove(src)
        g.input.insert(0, helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                        [n, c, s, s]))
        del g.output[:]
        g.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [n, d]))
        del model.metadata_props[:]
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def session(self) -> Any:
        """The ONNX Runtime session of the held graph (built on first use, one thread per
        call: the engine runs several at once)."""
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                self._session = ort.InferenceSession(self.onnx_graph(), opts,
                                                     providers=["CPUExecutionProvider"])
            return self._session

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, *feature_shape)`` float32 on ``x``'s device (no
        gradients: ONNX Runtime computes it)."""
        if torch.jit.is_tracing() or torch.compiler.is_exporting() \
                or torch.compiler.is_compiling():
            # ONNX Runtime's output would be traced as a constant: refuse to be traced (the
            # engine runs :meth:`embed_graph` instead of exporting)
            raise UserError("this backbone is an ONNX model already: nothing to export")
        a = x.detach().float().cpu().numpy()
        if self.layout == "NHWC":
            a = a.transpose(0, 2, 3, 1)
        session = self.session()
        out = run_batched(lambda c: session.run([self.output_name], {self.input_name: c})[0],
                          a, fixed_batch(session))
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy``) rebuild their own session and lock."""
        state = self.__dict__.copy()
        state["_session"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
