"""Types of the native module built from guard/_walk.c."""

from _typeshed import ReadableBuffer

def walk_predict_response(
    data: ReadableBuffer, /
) -> tuple[bytes | None, dict[str, tuple[int, tuple[int, ...], int, int, int]]] | None: ...
