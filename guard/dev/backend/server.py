"""A TF-Serving-compatible gRPC server for SavedModels (imports TensorFlow).

Transport-independent work lives in :class:`Repository` and :class:`Predictor`;
the servicers only move protobufs in and out and map :class:`BackendError` to a
gRPC status. Status codes and messages follow tensorflow/serving (server_core.cc,
predict_util.cc, get_model_metadata_impl.cc, get_model_status_impl.cc).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from guard.control.process import write_port_file
from guard.dev.backend._tensors import dtype_name, to_tensor_proto

if TYPE_CHECKING:
    from guard.dev.backend.rest import RestServer

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
_PREDICT_METHODS = (
    "tensorflow/serving/predict",
    "tensorflow/serving/classify",
    "tensorflow/serving/regress",
)
_T = TypeVar("_T")
# TensorFlow's error codes are gRPC's (tensorflow/core/protobuf/error_codes.proto).
_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


class BackendError(Exception):
    """A request error with the gRPC status code TF Serving uses for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelLoadError(Exception):
    """A model base path that cannot be served (reported at startup)."""


@dataclass
class Signature:
    """One signature of a loaded version: its SignatureDef and the callable."""

    name: str
    definition: meta_graph_pb2.SignatureDef
    function: Any | None
    """The loaded concrete function; None for non-callable entries (init ops)."""
    input_order: dict[str, int] = field(default_factory=dict)
    """Alias -> ``arg[i]`` index as TF's session reports it (inputs sorted by tensor name)."""


@dataclass
class Version:
    """One loaded version of a model."""

    number: int
    path: Path
    loaded: Any
    signatures: dict[str, Signature]
    metadata: Any
    """The packed SignatureDefMap (google.protobuf.Any) GetModelMetadata returns."""


@dataclass
class Model:
    """A served model: every numeric version directory under its base path."""

    name: str
    base_path: Path
    versions: dict[int, Version]

    @property
    def latest(self) -> Version:
        return self.versions[max(self.versions)]


def _version_dirs(base_path: Path) -> list[tuple[int, Path]]:
    found = []
    for child in base_path.iterdir():
        # TF Serving ignores anything that is not a non-negative integer.
        if child.is_dir() and child.name.isdigit():
            found.append((int(child.name), child))
    return sorted(found)


def _serving_meta_graph(version_dir: Path) -> meta_graph_pb2.MetaGraphDef:
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    except (OSError, DecodeError) as exc:
        raise ModelLoadError(
            f"{version_dir / 'saved_model.pb'}: not a SavedModel ({exc})"
        ) from None
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == {"serve"}:
            return meta_graph
    raise ModelLoadError(f"{version_dir}: no MetaGraphDef with tags {{serve}}")


def _load_version(number: int, path: Path) -> Version:
    if not (path / "saved_model.pb").is_file():
        raise ModelLoadError(f"{path}: no saved_model.pb")
    meta_graph = _serving_meta_graph(path)
    loaded = tf.saved_model.load(str(path), tags=["serve"])
    signatures: dict[str, Signature] = {}
    for name, definition in meta_graph.signature_def.items():
        function = loaded.signatures[name] if name in loaded.signatures else None
        by_tensor = sorted(definition.inputs, key=lambda alias: definition.inputs[alias].name)
        order = {alias: i for i, alias in enumerate(by_tensor)}
        signatures[name] = Signature(name, definition, function, order)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, definition in meta_graph.signature_def.items():
        signature_map.signature_def[name].CopyFrom(definition)
    metadata = get_model_metadata_pb2.GetModelMetadataResponse().metadata.get_or_create(
        "signature_def"
    )
    metadata.Pack(signature_map)
    version = Version(number, path, loaded, signatures, metadata)
    _warm_up(version)
    return version


def _warm_up(version: Version) -> None:
    """Run each numeric signature once on a batch of 1 so the first request is not slow."""
    for signature in version.signatures.values():
        if signature.function is None:
            continue
        feeds = {}
        for alias, info in signature.definition.inputs.items():
            dims = [d.size for d in info.tensor_shape.dim]
            if info.tensor_shape.unknown_rank or any(d < 0 for d in dims[1:]):
                break
            if info.dtype == types_pb2.DT_STRING:
                break
            shape = [1, *dims[1:]] if dims else []
            feeds[alias] = tf.zeros(shape, dtype=tf.as_dtype(info.dtype))
        else:
            try:
                signature.function(**feeds)
            except (tf.errors.OpError, TypeError, ValueError) as exc:
                logger.debug("warm-up of %s skipped: %s", signature.name, exc)


def load_model(name: str, base_path: Path) -> Model:
    """Load every version under ``base_path`` (TF Serving's layout)."""
    if not base_path.is_dir():
        raise ModelLoadError(f"model {name!r}: base path {base_path} is not a directory")
    found = _version_dirs(base_path)
    if not found:
        raise ModelLoadError(
            f"model {name!r}: no version directory (e.g. {base_path}/1/saved_model.pb) "
            f"under {base_path}"
        )
    versions = {number: _load_version(number, path) for number, path in found}
    logger.info("loaded model %s versions %s from %s", name, sorted(versions), base_path)
    return Model(name, base_path, versions)


class Repository:
    """The served models, looked up the way TF Serving's ServerCore does."""

    def __init__(self, models: Mapping[str, Model]) -> None:
        self.models = dict(models)

    def resolve(self, spec: model_pb2.ModelSpec) -> tuple[Model, Version]:
        if not spec.name:
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unrecognized servable version label: {spec.version_label}",
            )
        model = self.models.get(spec.name)
        if choice == "version":
            number = spec.version.value
            if model is None or number not in model.versions:
                raise BackendError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: Specific({spec.name}, {number})",
                )
            return model, model.versions[number]
        if model is None:
            raise BackendError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})"
            )
        return model, model.latest


def _sorted_join(names: Any) -> str:
    return ",".join(sorted(names))


def _shape_compatible(actual: tuple[int, ...], info: meta_graph_pb2.TensorInfo) -> bool:
    if info.tensor_shape.unknown_rank:
        return True
    expected = [d.size for d in info.tensor_shape.dim]
    if len(expected) != len(actual):
        return False
    return all(e < 0 or e == a for e, a in zip(expected, actual, strict=True))


def _shape_text(dims: Any) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


class Predictor:
    """Predict / GetModelMetadata / GetModelStatus on a :class:`Repository` (blocking)."""

    def __init__(self, repository: Repository, *, tensor_content: bool = False) -> None:
        self.repository = repository
        self.tensor_content = tensor_content

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        if not request.HasField("model_spec"):
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        model, version = self.repository.resolve(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = version.signatures.get(signature_name)
        if signature is None:
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        definition = signature.definition
        if definition.method_name not in _PREDICT_METHODS or signature.function is None:
            raise BackendError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of {"
                + ", ".join(_PREDICT_METHODS)
                + "}. Was: "
                + definition.method_name,
            )
        feeds = self._decode_inputs(request, definition, model.name)
        aliases = self._output_aliases(request, definition)
        self._check_inputs(request, signature)
        try:
            results = signature.function(**feeds)
        except tf.errors.OpError as exc:
            code = _STATUS_BY_NUMBER.get(exc.error_code, grpc.StatusCode.UNKNOWN)
            raise BackendError(code, exc.message) from exc

        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = signature_name
        response.model_spec.version.value = version.number
        for alias in aliases:
            array = results[alias].numpy()
            proto = to_tensor_proto(
                array, definition.outputs[alias].dtype, tensor_content=self.tensor_content
            )
            response.outputs[alias].CopyFrom(proto)
        return response

    @staticmethod
    def _decode_inputs(
        request: predict_pb2.PredictRequest,
        definition: meta_graph_pb2.SignatureDef,
        model_name: str,
    ) -> dict[str, tf.Tensor]:
        expected = set(definition.inputs)
        sent = set(request.inputs)
        if len(sent) != len(expected):
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{_sorted_join(sent)}}}) != len({{{_sorted_join(expected)}}}). "
                f"Sent extra: {{{_sorted_join(sent - expected)}}}. "
                f"Missing but required: {{{_sorted_join(expected - sent)}}}.",
            )
        feeds: dict[str, tf.Tensor] = {}
        for alias in sorted(sent):
            if alias not in expected:
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{_sorted_join(expected)}}}.",
                )
            proto = request.inputs[alias]
            try:
                array = tf.make_ndarray(proto)
                feeds[alias] = tf.constant(array, dtype=tf.as_dtype(proto.dtype))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's
                logger.debug("model %s input %s: %s", model_name, alias, exc)
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}"
                ) from exc
        return feeds

    @staticmethod
    def _output_aliases(
        request: predict_pb2.PredictRequest, definition: meta_graph_pb2.SignatureDef
    ) -> list[str]:
        if not request.output_filter:
            return sorted(definition.outputs)
        seen: set[str] = set()
        for alias in request.output_filter:
            if alias not in definition.outputs:
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{_sorted_join(definition.outputs)}}}.",
                )
            if alias in seen:
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}"
                )
            seen.add(alias)
        return list(request.output_filter)

    @staticmethod
    def _check_inputs(request: predict_pb2.PredictRequest, signature: Signature) -> None:
        """Dtype and shape checks TF's session performs when the graph runs."""
        for alias in sorted(request.inputs, key=signature.input_order.__getitem__):
            proto = request.inputs[alias]
            info = signature.definition.inputs[alias]
            if proto.dtype != info.dtype:
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{signature.input_order[alias]}] to be "
                    f"{dtype_name(info.dtype)} but {dtype_name(proto.dtype)} is provided",
                )
            actual = tuple(d.size for d in proto.tensor_shape.dim)
            if not _shape_compatible(actual, info):
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {alias} has shape {_shape_text(actual)} but signature "
                    f"{signature.name} expects {_shape_text(d.size for d in info.tensor_shape.dim)}"
                    " (-1: any size)",
                )

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for metadata_field in request.metadata_field:
            if metadata_field != "signature_def":
                raise BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Metadata field {metadata_field} is not supported",
                )
        model, version = self.repository.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = version.number
        response.metadata["signature_def"].CopyFrom(version.metadata)
        return response

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        model = self.repository.models.get(spec.name)
        if spec.HasField("version"):
            number = spec.version.value
            if model is None or number not in model.versions:
                raise BackendError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {number} of model {spec.name}",
                )
            numbers = [number]
        else:
            if model is None:
                raise BackendError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
                )
            # ServableStateMonitor's version map is ordered newest first.
            numbers = sorted(model.versions, reverse=True)
        response = get_model_status_pb2.GetModelStatusResponse()
        for number in numbers:
            status = response.model_version_status.add()
            status.version = number
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.SetInParent()
        return response


class _Runner:
    """Runs blocking TensorFlow work off the event loop and maps errors to statuses."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor

    async def __call__(
        self, context: grpc.aio.ServicerContext, fn: Callable[[Any], _T], request: Any
    ) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, request)
        except BackendError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises


def _unimplemented(method: str, hint: str) -> str:
    return (
        f"{method} is not implemented by the guard's local backend, which serves Predict, "
        f"GetModelMetadata and GetModelStatus only; {hint}"
    )


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]
    """tensorflow.serving.PredictionService."""

    def __init__(self, predictor: Predictor, runner: _Runner) -> None:
        self._predictor = predictor
        self._run = runner

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._run(context, self._predictor.predict, request)

    async def GetModelMetadata(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._run(context, self._predictor.get_model_metadata, request)

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented("Classify", "use Predict, or TensorFlow Serving for tf.Example input"),
        )

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented("Regress", "use Predict, or TensorFlow Serving for tf.Example input"),
        )

    async def MultiInference(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented("MultiInference", "use Predict, or TensorFlow Serving"),
        )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):  # type: ignore[misc]
    """tensorflow.serving.ModelService."""

    def __init__(self, predictor: Predictor, runner: _Runner) -> None:
        self._predictor = predictor
        self._run = runner

    async def GetModelStatus(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._run(context, self._predictor.get_model_status, request)

    async def HandleReloadConfigRequest(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            _unimplemented(
                "HandleReloadConfigRequest", "restart it with other --model arguments instead"
            ),
        )


def log_device() -> str:
    """Log (and return) where TensorFlow will run: the GPUs it sees, else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            # Take GPU memory as needed instead of all of it at start-up.
            tf.config.experimental.set_memory_growth(gpu, True)
        names = ", ".join(gpu.name for gpu in gpus)
        logger.info("device: running on GPU (%s)", names)
        return "GPU"
    logger.info("device: no GPU visible to TensorFlow, running on CPU")
    return "CPU"


@dataclass
class ServeOptions:
    """Everything ``guard backend`` needs to run."""

    models: dict[str, Path]
    listen: str = "127.0.0.1:8510"
    tensor_content: bool = False
    port_file: Path | None = None
    max_message_mb: int = 256
    rest_listen: str | None = None
    """TF Serving's REST API on this address too (needs aiohttp)."""
    workers: int = 4
    shutdown_grace_s: float = 5.0


async def serve(options: ServeOptions) -> None:
    """Load the models, serve until SIGINT/SIGTERM, then stop gracefully."""
    log_device()
    models = {name: load_model(name, path) for name, path in options.models.items()}
    predictor = Predictor(Repository(models), tensor_content=options.tensor_content)
    max_bytes = options.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="tf") as executor:
        runner = _Runner(executor)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(predictor, runner), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(predictor, runner), server
        )
        port = server.add_insecure_port(options.listen)
        if port == 0:
            raise ModelLoadError(f"cannot listen on {options.listen}")
        await server.start()
        host = options.listen.rsplit(":", 1)[0]
        encoding = "tensor_content" if options.tensor_content else "typed *_val fields"
        logger.info(
            "serving %s on %s:%d (responses as %s)", ", ".join(models), host, port, encoding
        )
        rest = await _start_rest(options, predictor, executor)
        if options.port_file is not None:
            ports = {"grpc": port} | ({"rest": rest.port} if rest else {})
            write_port_file(options.port_file, ports)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("stopping (grace %.0f s)", options.shutdown_grace_s)
        if rest is not None:
            await rest.stop()
        await server.stop(options.shutdown_grace_s)


async def _start_rest(
    options: ServeOptions, predictor: Predictor, executor: ThreadPoolExecutor
) -> RestServer | None:
    if options.rest_listen is None:
        return None
    from guard.dev.backend.rest import RestServer  # aiohttp only when REST is asked for

    rest = RestServer(
        predictor,
        executor,
        max_body_mb=options.max_message_mb,
        shutdown_grace_s=options.shutdown_grace_s,
    )
    port = await rest.start(options.rest_listen)
    host = options.rest_listen.rsplit(":", 1)[0]
    logger.info("Exporting HTTP/REST API at:%s:%d ...", host, port)
    return rest


def run_server(options: ServeOptions) -> int:
    """Blocking entry point; returns the exit code."""
    try:
        asyncio.run(serve(options))
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 2
    return 0
