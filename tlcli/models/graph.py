"""A Keras model as a fast inference graph: batch norms folded, weights as constants, saved and reloaded as a
GraphDef, and run over image files."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from tlcli.data import images
from tlcli.models import engines
from tlcli.models.portable import VIEWS_MODEL, takes_image, view_layer

CONSTANT_WEIGHTS_LIMIT = 1 << 28


def _fold_batch_norms(model, values: dict[int, np.ndarray]) -> None:
    """Fold each batch norm that only follows a convolution into that convolution's weights, in ``values``.

    ``values`` maps id(variable) to its value. The kernel (and bias) are scaled by gamma / sqrt(variance
    + epsilon) and the batch norm is left adding a shifted beta (mean 0, variance 1 - epsilon, gamma 1),
    which the graph optimiser reduces to a bias add: one multiply-add pass over the activations less
    per layer. The same function up to float rounding.
    """
    import keras

    layers = model._flatten_layers(include_self=True)
    outputs = {
        id(t) for m in layers if isinstance(m, keras.Model) for t in keras.tree.flatten(getattr(m, "outputs", []))
    }
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    for bn in layers:
        if not isinstance(bn, keras.layers.BatchNormalization) or not bn.center or len(bn._inbound_nodes) != 1:
            continue
        parents = bn._inbound_nodes[0].parent_nodes
        conv = parents[0].operation if len(parents) == 1 else None
        if (
            not isinstance(conv, convs)
            or len(conv._inbound_nodes) != 1
            or len(conv._outbound_nodes) != 1
            or id(conv._inbound_nodes[0].outputs[0]) in outputs
            or conv.data_format != "channels_last"
            or conv.activation is not keras.activations.linear
            or bn.axis not in (-1, len(conv._inbound_nodes[0].outputs[0].shape) - 1)
        ):
            continue
        mean, var = values[id(bn.moving_mean)], values[id(bn.moving_variance)]
        gamma = values[id(bn.gamma)] if bn.scale else 1.0
        scale = (gamma / np.sqrt(var.astype(np.float64) + bn.epsilon)).astype(var.dtype)
        kernel = values[id(conv.kernel)]
        depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
        values[id(conv.kernel)] = kernel * (scale.reshape(kernel.shape[-2:]) if depthwise else scale)
        if conv.use_bias:
            values[id(conv.bias)] = values[id(conv.bias)] * scale
        values[id(bn.beta)] = values[id(bn.beta)] - mean * scale
        values[id(bn.moving_mean)] = np.zeros_like(mean)
        values[id(bn.moving_variance)] = np.full_like(var, 1.0 - bn.epsilon)
        if bn.scale:
            values[id(bn.gamma)] = np.ones_like(values[id(bn.gamma)])


def _caller(model) -> Callable:
    """How a pixel batch [b, *shape] enters ``model``: whole, or split into the views a multi-input model takes."""
    n_inputs = len(model.inputs)
    if n_inputs == 1:
        return lambda x: x
    return lambda x: [x[:, i] for i in range(n_inputs)]


def inference_function(model, shape: tuple[int, ...], dtype: str = "uint8"):
    """A graph that maps a pixel batch [any batch size, *shape] (uint8, or ``dtype``) to the model's outputs.

    ``shape`` is (size, size, 3) or (views, size, size, 3) for a model taking views, (None, None, 3)
    for one taking whole photos. Weights up to ``CONSTANT_WEIGHTS_LIMIT`` bytes are traced in as
    constants rather than variable reads, with batch norms folded into the convolutions before them,
    so TensorFlow's graph optimiser can fuse each convolution with its bias and activation (MobileNet
    0.25: ~40% less CPU time per image, outputs equal to ~2e-5); bigger models read their variables,
    keeping a single copy of the weights in memory.
    """
    import tensorflow as tf

    spec = tf.TensorSpec((None, *shape), tf.as_dtype(dtype))
    enter = _caller(model)
    if sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.variables) > CONSTANT_WEIGHTS_LIMIT:
        return tf.function(lambda x: model(enter(tf.cast(x, tf.float32)), training=False), input_signature=[spec])
    values = {id(v): v.numpy() for v in model.variables}
    _fold_batch_norms(model, values)
    trainable = [values[id(v)] for v in model.trainable_variables]
    frozen = [values[id(v)] for v in model.non_trainable_variables]

    def run(x):
        constants = [tf.constant(w) for w in trainable], [tf.constant(w) for w in frozen]
        return model.stateless_call(*constants, enter(tf.cast(x, tf.float32)), training=False)[0]

    return tf.function(run, input_signature=[spec])


def graph_bytes(infer) -> tuple[bytes, str, str] | None:
    """An ``inference_function`` graph as a self-contained GraphDef with its input and output tensor
    names, to run again without Keras (``load_graph``); None when it reads variables."""
    concrete = infer.get_concrete_function()
    if concrete.captured_inputs:
        return None
    return concrete.graph.as_graph_def().SerializeToString(), concrete.inputs[0].name, concrete.outputs[0].name


def load_graph(data: bytes, input_name: str, output_name: str):
    """The function ``graph_bytes`` saved: uint8 pixel batch in, outputs out.

    The graph is imported with its input mapped onto the wrapper's own placeholder, which avoids
    ``prune`` (0.3 s of Python copying every op, most of a small incremental run's fixed cost).
    """
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef.FromString(data)
    node = next(n for n in graph_def.node if n.name == input_name.split(":")[0])
    spec = tf.TensorSpec(tf.TensorShape(node.attr["shape"].shape), tf.as_dtype(node.attr["dtype"].type))

    def imported(pixels):
        return tf.compat.v1.import_graph_def(
            graph_def, input_map={input_name: pixels}, return_elements=[output_name], name=""
        )[0]

    run = tf.compat.v1.wrap_function(imported, [spec])
    return lambda pixels: run(tf.constant(pixels))


def scorer(
    model, size: int, resize: str, *, engine: str = "keras"
) -> Callable[..., tuple[np.ndarray, list[int], list[dict]]]:
    """``apply_model`` with the model traced once (and converted, on OpenVINO): call it with (paths, batch_size,
    progress) as often as needed, so a caller can score files a batch at a time (predict prints each batch's lines
    as they come). ``engine`` is an ``engines.resolve`` value."""
    width = int(model.output_shape[-1])
    engine = engines.resolve(engine)
    if takes_image(model):
        infer = inference_function(model, (None, None, 3)) if engine == "keras" else _openvino_photos(model, resize)
        return lambda paths, batch_size=32, progress=None: apply_photos(infer, width, paths, size, batch_size, progress)
    infer = inference_function(model, images.pixel_shape(size, resize))
    if engine == "openvino":
        infer = engines.load(engines.convert(infer))
    return lambda paths, batch_size=32, progress=None: apply_graph(
        infer, width, paths, size, resize, batch_size, progress
    )


def apply_model(
    model,
    paths: Sequence[str],
    size: int,
    resize: str,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    *,
    engine: str = "keras",
) -> tuple[np.ndarray, list[int], list[dict]]:
    """Run a pixels-in model over image files: (outputs of the decodable ones, their indices, skipped files).

    A model that takes whole photos (``portable.takes_image``) is fed each decoded photo as it is, as a
    deployer feeds it; one saved before, or one that takes views, is fed tlcli's views. ``engine`` is an
    ``engines.resolve`` value.
    """
    return scorer(model, size, resize, engine=engine)(paths, batch_size, progress)


def _openvino_photos(model, resize: str) -> Callable[[np.ndarray], np.ndarray]:
    """A whole-photo model on OpenVINO: TensorFlow makes the views with the model's own ``Resizing`` geometry
    (OpenVINO has no antialiased resize), OpenVINO runs the converted views model on them."""
    import tensorflow as tf

    views_model = model.get_layer(VIEWS_MODEL)
    size = int(views_model.inputs[0].shape[1])
    layers = [view_layer(size, policy) for policy in images.views(resize)]
    shape = images.pixel_shape(size, resize)
    stack = (lambda v: v[0]) if len(layers) == 1 else (lambda v: tf.stack(v, axis=1))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8)])
    def views(photos):
        return stack([layer(tf.cast(photos, tf.float32), training=False) for layer in layers])

    net = engines.load(engines.convert(inference_function(views_model, shape, dtype="float32")))
    return lambda photos: net(views(photos).numpy())


def _collect(outputs: list, kept: list, skipped: list, paths: Sequence[str], done: int, ok, why) -> None:
    """File one batch's outputs (``outputs`` holds a row per file, None where it did not decode)."""
    for j, row in enumerate(outputs):
        if ok[j]:
            kept.append((done + j, row))
        else:
            skipped.append({"path": paths[done + j], "reason": why[j]})


def _photo_outputs(
    infer, paths: Sequence[str], size: int, batch_size: int, progress: Callable[[int, int], None] | None
) -> Iterator[tuple[list, np.ndarray, list[str]]]:
    """A graph on whole photos over image files a batch at a time: consecutive photos of one size go in as one
    batch; (outputs, None where a file did not decode; ok mask; why)."""
    done = 0
    for photos, ok, why in images.photo_batches(list(paths), size, batch_size):
        rows: list = [None] * len(photos)
        start = 0
        while start < len(photos):
            end = start + 1
            while end < len(photos) and ok[end] == ok[start] and photos[end].shape == photos[start].shape:
                end += 1
            if ok[start]:
                rows[start:end] = list(np.asarray(infer(np.stack(photos[start:end]))))
            start = end
        yield rows, ok, why
        done += len(photos)
        if progress:
            progress(done, len(paths))


def _collected(batches, width: int, paths: Sequence[str]) -> tuple[np.ndarray, list[int], list[dict]]:
    """(outputs of the decodable files, their indices, skipped files with why) from (outputs, ok, why) batches."""
    kept: list = []
    skipped: list = []
    done = 0
    for outputs, ok, why in batches:
        _collect(list(outputs), kept, skipped, paths, done, ok, why)
        done += len(ok)
    return np.asarray([row for _, row in kept], np.float32).reshape(-1, width), [i for i, _ in kept], skipped


def apply_photos(
    infer,
    width: int,
    paths: Sequence[str],
    size: int,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[int], list[dict]]:
    """``apply_graph`` for a graph on whole photos (``_photo_outputs``)."""
    return _collected(_photo_outputs(infer, paths, size, batch_size, progress), width, paths)


def graph_batches(
    infer,
    paths: Sequence[str],
    size: int,
    resize: str,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """The model's graph (``inference_function`` or ``load_graph``) over image files a batch at a time, in order:
    (outputs, ok mask, why each file that did not decode failed), so a caller need not hold every output.

    The graph takes any batch size, so a short final batch costs only its own images.
    """
    done = 0
    for pixels, ok, why in images.batches(list(paths), size, resize, batch_size):
        yield np.asarray(infer(pixels)), ok, why
        done += len(pixels)
        if progress:
            progress(done, len(paths))


def apply_graph(
    infer,
    width: int,
    paths: Sequence[str],
    size: int,
    resize: str,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[int], list[dict]]:
    """``apply_model`` with the model's graph (``graph_batches``) and output width."""
    return _collected(graph_batches(infer, paths, size, resize, batch_size, progress), width, paths)
