"""Types of the native module built from guard/dataplane/_walk.c."""

from collections.abc import Sequence

from _typeshed import ReadableBuffer

class OutputLayout(tuple[str, int, tuple[int, ...], int, int, int]):
    """Where one output of a PredictResponse keeps its parts (a struct sequence)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def from_content(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...

def walk_predict_response(
    data: ReadableBuffer, /
) -> tuple[bytes | None, tuple[OutputLayout, ...], dict[str, OutputLayout]] | None: ...
def scan_tensor(
    text: ReadableBuffer, start: int, end: int, /
) -> (
    tuple[
        bytearray,
        bytearray,
        bytearray,
        bool,
        bytearray | None,
        tuple[int, ...],
        int,
        bytearray | None,
        list[int] | None,
    ]
    | None
): ...
def peek_request(
    body: ReadableBuffer, strings_max: int, key_bytes_max: int, signature_max: int, /
) -> tuple[str | None, int, bool, bool] | None: ...
def reuse_texts(
    body: ReadableBuffer,
    starts: ReadableBuffer,
    ends: ReadableBuffer,
    pool: ReadableBuffer,
    derived: ReadableBuffer,
    batch: int,
    width: int,
    /,
) -> tuple[list[str | None], int]: ...
def row_members(
    columns: Sequence[tuple[str, list[str], int, bool]], batch: int, /
) -> list[str] | None: ...
def skip_value(text: ReadableBuffer, start: int, /) -> int: ...
def numbers_at_most(text: ReadableBuffer, enough: int, /) -> int: ...
